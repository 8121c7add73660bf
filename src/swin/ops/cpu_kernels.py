"""Small AVX-512 kernels for fp32 and bf16 on the CPU, in C, compiled on first use: window attention
(forward and backward), GELU's backward, and the row passes of the chunked inference path.

**Window attention.** On a CPU, Swin's attention is a great many tiny products: per window and
head, (N x d) @ (d x N) and (N x N) @ (N x d) with N = 49 and d = 32. PyTorch's CPU flash-attention
kernel (what ``F.scaled_dot_product_attention`` runs) reaches ~55-85 GFLOP/s on them, a fifth of what
the same two cores give the model's large products; attention was 9-12% of fp32 inference on the
chunked path (``cpu_tiled``) while holding 2-3% of its arithmetic. This kernel keeps one
window-head's K^T, logits and probabilities in a few KB of stack, computes q k^T in 4 x 64 register
tiles (16 AVX-512 accumulators), adds the (bias + shift mask) row, takes the softmax with a
polynomial exp, and multiplies by V in the same tiles, writing straight into the (tokens, C) output
at the head's columns. At N = 49 (3 x 16 + 1) a fourth key vector would hold one key in 16 lanes:
there the first 48 keys take 7 x 48 tiles (49 rows = 7 tiles, 21 accumulators), the 49th key's
logit is a dot product per row, and P V runs in 7-row tiles (1.03-1.14x the 4-row tiles alone).
With the spread prefetches below: 1.77-1.83x SDPA at N = 49 in the same run (the 4-row tiles with one
prefetch burst per item: 1.47-1.54x). No logits tensor is made; in training the kernel
also writes the probabilities, from which the backward kernel (windows up to 64 tokens) computes
dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = scale dS K and dK = scale dS^T Q per
window and head in the same register tiles, and writes dS, whose sum over the batch is the bias and
mask gradient (``sdpa._CpuKernelAttention``; 1.6x PyTorch's products at Swin-T's shapes). The function is ``softmax(scale * q k^T + mask) v``; probabilities below e^-80 (the shift
mask's -100 gives ~1e-44: subnormal floats, which slow every later multiply) are set to 0, which
changes no output by more than 1e-34 of its scale. For V2's cosine attention in inference the kernel
also unit-normalises each window-head's q and k rows (q times exp(logit_scale)) in a stack copy,
instead of PyTorch's norm and multiply over the whole qkv beforehand (stop 19: SwinV2-T inference
1.045x in fp32, 1.21x under bf16 autocast).

Each window-head's q, k and v rows (and in the backward dO and P) are prefetched while the previous
one computes: they come from a product far larger than the caches (Swin-B stage 3: 84 -> 114
GFLOP/s alone with cold inputs, 90 -> 104 in the model). The forward spreads them over its row
tiles, a tile's rows of the next item per tile: issued at once, they filled the core's outstanding-miss
slots and stalled the current item's own loads (1.06-1.14x alone at N = 49 and 64).

**bf16** (under CPU autocast, stop 19): the attention forward and backward and the row passes (not
patch merging) also take bf16 tensors. They compute in fp32 and round each result once to bf16 (to
nearest even, as PyTorch): attention converts each window-head's q/k/v (and dO) rows into fp32 on the
stack and runs the fp32 kernel on them with an fp32 mask (1.67x bf16 SDPA alone at Swin-B's shapes);
in training the probabilities and dS stay fp32. Heads and rows of a multiple of 16 channels. Under
bf16 autocast, Swin-T inference 1.14x (attention) and a further 1.075x (rows), Swin-B 1.15x and
1.06x, SwinV2-T 1.03x and 1.085x; a Swin-T training step 1.105x, SwinV2-T 1.005x (in-process A/Bs).

**GELU's backward** with its forward recomputed (``mlp._RecomputeGeluMlp``): GELU(h) and the
gradient at h in one pass, one erf and one exp per element (PyTorch's pair: two and one).

**Row passes** (``cpu_tiled``): a chunk's rows gathered from the stage's token buffer with their
LayerNorm and the projection's bias in one pass (``norm_rows``; PyTorch: an index_select, a
layer_norm and an add), the norm before fc1 with fc2's bias added in place, V2's ``x += norm(y)``,
the scatter back (``scatter_rows``), and patch merging's 2 x 2 gather with V1's norm
(``merge_rows``). Each has its PyTorch reference beside it (``*_reference``), taken for other
dtypes or where the kernels do not run. LayerNorm at C = 96-128: 1.5x PyTorch's; gather + norm +
bias 2x; scatter 3.5x (at C = 512 all are bound by memory and gain little).

All are checked against fp64 or against PyTorch (tests/test_ops.py). They run where the CPU has
AVX-512 and a C compiler (``cc``, or ``$CC``) is on the PATH; the shared library is built once into
``$SWIN_CACHE_DIR`` (default ``~/.cache/swin``; a temporary file renamed into place) and loaded with
ctypes. Its threads are PyTorch's own OpenMP threads (the library links ``libgomp.so.1``, which the
process has already loaded from torch). Anywhere else (no compiler, another CPU, fp16, bf16 training
with windows above 64 tokens, heads above 64 channels, windows above 256 tokens, inside torch.compile,
or ``SWIN_CPU_KERNELS=0``) the callers take their PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .. import windows

MAX_TOKENS = 256  # tokens per window the kernel's stack buffers hold (window 16)

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#define MAXN 256  /* tokens per window, forward (MAX_TOKENS) */
#define MAXNB 64  /* tokens per window, backward (MAX_BACKWARD_TOKENS): its dS stays on the stack */
#define MAXD 64

int swin_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* where prefetch_rows asks for the next item's rows: L2 on AMD CPUs, L1 elsewhere (set when the
   library is loaded) */
static int prefetch_to_l2;

__attribute__((constructor)) static void swin_choose_prefetch(void) {
    __builtin_cpu_init();
    prefetch_to_l2 = __builtin_cpu_is("amd");
}

#define AVX512 __attribute__((target("avx512f,fma")))

/* the first min(left, 16) lanes of a vector */
static inline __mmask16 first_lanes(long left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* ask for rows 0..n-1 of d floats (row stride ts) to be brought into the cache: the next item's
   inputs while this one computes (they come from a product far larger than the caches; without it the
   kernel waits on memory at Swin-B's stage 3: 84 against 130 GFLOP/s with its inputs in cache). Into
   L1 on Intel (the 2-core Xeon VM, stop 18: L2 instead ran 0.89-0.97x), into L2 on AMD (the 2-core
   Zen 4 VM, stop 21: forward ~1.1x at 7 x 7 windows, Swin-T's attention 26.0 -> 23.9 ms per
   forward; there an item's own rows, K^T and mask rows fill most of the 32 KB L1, and the next
   item's 19 KB pulled in beside them evicted what this one still read) */
static inline AVX512 __attribute__((always_inline)) void prefetch_rows(const float *x, long ts, long n, long d) {
    if (prefetch_to_l2) {
        for (long i = 0; i < n; i++)
            for (long c = 0; c < d; c += 16) _mm_prefetch((const char *)(x + i * ts + c), _MM_HINT_T1);
    } else {
        for (long i = 0; i < n; i++)
            for (long c = 0; c < d; c += 16) _mm_prefetch((const char *)(x + i * ts + c), _MM_HINT_T0);
    }
}

/* exp(x) for x <= 0 (logits minus their row maximum), Cephes' expf polynomial, ~1 ulp;
   lanes below -80 (and -inf) give exactly 0 */
static inline AVX512 __m512 exp_nonpos(__m512 x) {
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-80.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-80.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* acc[r][u] = q_(i0+r) . K^T columns [16*(c0+u), 16*(c0+u+1)), R rows x NV vectors of 16 keys
   (R * NV <= 21 accumulators in registers); rows past the last query repeat it (computed, never stored) */
static inline AVX512 __attribute__((always_inline)) void qk_accumulate(
        __m512 acc[][4], const float *q, long qs, const float *kt, int np, int n, int d, int i0, int c0,
        const int NV, const int R) {
    const float *qr[7];
    for (int r = 0; r < R; r++) {
        int i = i0 + r < n ? i0 + r : n - 1;
        qr[r] = q + (long)i * qs;
        for (int u = 0; u < NV; u++) acc[r][u] = _mm512_setzero_ps();
    }
    for (int c = 0; c < d; c++) {  /* kt rows are 64-byte aligned (np a multiple of 16) */
        __m512 kv[4];
        for (int u = 0; u < NV; u++) kv[u] = _mm512_load_ps(kt + (long)c * np + 16 * (c0 + u));
        for (int r = 0; r < R; r++) {
            __m512 qb = _mm512_set1_ps(qr[r][c]);
            for (int u = 0; u < NV; u++) acc[r][u] = _mm512_fmadd_ps(qb, kv[u], acc[r][u]);
        }
    }
}

/* logits of rows i0..i0+3 against key columns [16*c0, 16*(c0+NV)): s = scale * q k^T + mask,
   lanes past the last key -inf */
static inline AVX512 __attribute__((always_inline)) void qk_tile(
        const float *q, long qs, const float *kt, int np, const float *mrow, int n, int d,
        int i0, int c0, float scale, float *s, const int NV) {
    __m512 acc[4][4];
    qk_accumulate(acc, q, qs, kt, np, n, d, i0, c0, NV, 4);
    __m512 vs = _mm512_set1_ps(scale);
    for (int r = 0; r < 4 && i0 + r < n; r++) {
        for (int u = 0; u < NV; u++) {
            int j = 16 * (c0 + u);
            __mmask16 m = first_lanes(n - j);
            __m512 b = _mm512_maskz_loadu_ps(m, mrow + (long)(i0 + r) * n + j);
            __m512 v = _mm512_fmadd_ps(acc[r][u], vs, b);
            v = _mm512_mask_blend_ps(m, _mm512_set1_ps(-__builtin_inff()), v);
            _mm512_storeu_ps(s + r * np + j, v);
        }
    }
}

/* rows i0..i0+3 when all n <= 16 * NV keys fit one tile: logits as qk_tile, then each row's max,
   exp and sum in registers; s gets the unnormalised exponentials, inv[r] 1 / (row sum) */
static inline AVX512 __attribute__((always_inline)) void qk_softmax_tile(
        const float *q, long qs, const float *kt, int np, const float *mrow, int n, int d,
        int i0, float scale, float *s, float *inv, const int NV) {
    __m512 acc[4][4];
    qk_accumulate(acc, q, qs, kt, np, n, d, i0, 0, NV, 4);
    __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-__builtin_inff());
    for (int r = 0; r < 4; r++) {
        int i = i0 + r < n ? i0 + r : n - 1;
        __m512 mx = ninf;
        for (int u = 0; u < NV; u++) {
            __mmask16 m = first_lanes(n - 16 * u);
            __m512 b = _mm512_maskz_loadu_ps(m, mrow + (long)i * n + 16 * u);
            acc[r][u] = _mm512_mask_blend_ps(m, ninf, _mm512_fmadd_ps(acc[r][u], vs, b));
            mx = _mm512_max_ps(mx, acc[r][u]);
        }
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int u = 0; u < NV; u++) {
            __m512 e = exp_nonpos(_mm512_sub_ps(acc[r][u], m));
            _mm512_store_ps(s + r * np + 16 * u, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
}

/* rows i0..i0+6 when n = 16 * NV + 1 or + 2 keys (49 = 3 x 16 + 1: a 7 x 7 window): a fourth vector
   for the last key or two would be 15/16 empty, so the full vectors take 7-row tiles (21 accumulators:
   49 rows are 7 tiles, not 13 of 4) and each tail key's logit is a dot product per row; softmax as
   qk_softmax_tile, the tail keys' exponentials one vector for the tile's 7 rows. kt holds the first
   16 * NV keys (row stride 16 * NV); s rows (stride np) get the n unnormalised exponentials */
static inline AVX512 __attribute__((always_inline)) void qk_softmax_tail_tile(
        const float *q, long qs, const float *k, long ks, const float *kt, const float *mrow, int n, int d,
        int i0, float scale, float *s, int np, float *inv, const int NV) {
    __m512 acc[7][4];
    qk_accumulate(acc, q, qs, kt, 16 * NV, n, d, i0, 0, NV, 7);
    const int nt = n - 16 * NV;
    float tl[2][16] __attribute__((aligned(64))), mx[16] __attribute__((aligned(64)));
    __m512 vs = _mm512_set1_ps(scale);
    for (int r = 0; r < 7; r++) {
        int i = i0 + r < n ? i0 + r : n - 1;
        const float *qr = q + (long)i * qs, *mr = mrow + (long)i * n;
        __m512 m = _mm512_set1_ps(-__builtin_inff());
        for (int u = 0; u < NV; u++) {
            acc[r][u] = _mm512_fmadd_ps(acc[r][u], vs, _mm512_loadu_ps(mr + 16 * u));
            m = _mm512_max_ps(m, acc[r][u]);
        }
        float rm = _mm512_reduce_max_ps(m);
        for (int t = 0; t < nt; t++) {
            const float *kj = k + (long)(16 * NV + t) * ks;
            __m512 e = _mm512_setzero_ps();
            for (int c = 0; c < d; c += 16) {
                __mmask16 dm = first_lanes(d - c);
                e = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(dm, qr + c), _mm512_maskz_loadu_ps(dm, kj + c), e);
            }
            float lt = _mm512_reduce_add_ps(e) * scale + mr[16 * NV + t];
            tl[t][r] = lt;
            rm = lt > rm ? lt : rm;
        }
        mx[r] = rm;
        __m512 mv = _mm512_set1_ps(rm), sum = _mm512_setzero_ps();
        for (int u = 0; u < NV; u++) {
            __m512 e = exp_nonpos(_mm512_sub_ps(acc[r][u], mv));
            _mm512_store_ps(s + r * np + 16 * u, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[r] = _mm512_reduce_add_ps(sum);
    }
    __m512 mxv = _mm512_maskz_load_ps(0x7F, mx);
    for (int t = 0; t < nt; t++) {
        _mm512_store_ps(tl[t], exp_nonpos(_mm512_sub_ps(_mm512_maskz_load_ps(0x7F, tl[t]), mxv)));
        for (int r = 0; r < 7; r++) {
            s[r * np + 16 * NV + t] = tl[t][r];
            inv[r] += tl[t][r];
        }
    }
    for (int r = 0; r < 7; r++) inv[r] = 1.0f / inv[r];
}

/* out rows i0..i0+R-1 (those < n) = inv[r] * (p v), where row r of p has element j at p[r * prs + j * pcs]
   (prs = np, pcs = 1: rows of a tile; prs = 1, pcs = row length: columns, i.e. p transposed) and p's
   rows past the last (i0 + r >= n) repeat it (computed, never stored); DV = ceil(d / 16) vectors per
   row, the last one's lanes past d masked by tail; R * DV <= 16 accumulators */
static inline AVX512 __attribute__((always_inline)) void pv_tile(
        const float *p, long prs, long pcs, const float *inv, const float *v, long vs_, float *out, long os, int n,
        int i0, __mmask16 tail, const int DV, const int R) {
    __m512 acc[7][4];
    const float *pr[7];
    for (int r = 0; r < R; r++) {
        pr[r] = p + (i0 + r < n ? r : n - 1 - i0) * prs;
        for (int u = 0; u < DV; u++) acc[r][u] = _mm512_setzero_ps();
    }
    for (int j = 0; j < n; j++) {
        __m512 vv[4];
        for (int u = 0; u < DV; u++) vv[u] = _mm512_maskz_loadu_ps(u == DV - 1 ? tail : 0xFFFF, v + (long)j * vs_ + 16 * u);
        for (int r = 0; r < R; r++) {
            __m512 pb = _mm512_set1_ps(pr[r][j * pcs]);
            for (int u = 0; u < DV; u++) acc[r][u] = _mm512_fmadd_ps(pb, vv[u], acc[r][u]);
        }
    }
    for (int r = 0; r < R && i0 + r < n; r++) {
        __m512 f = _mm512_set1_ps(inv[r]);
        for (int u = 0; u < DV; u++)
            _mm512_mask_storeu_ps(out + (long)(i0 + r) * os + 16 * u, u == DV - 1 ? tail : 0xFFFF, _mm512_mul_ps(acc[r][u], f));
    }
}

/* pv_tile with DV chosen at run time from d: 4-row tiles, or 7-row tiles for d <= 32 (R = 7) */
static inline AVX512 __attribute__((always_inline)) void pv_rows(
        const float *p, long prs, long pcs, const float *inv, const float *v, long vs_, float *out, long os, int n,
        int i0, int d, const int R) {
    __mmask16 tail = d % 16 ? (__mmask16)((1u << (d % 16)) - 1u) : (__mmask16)0xFFFF;
    if (R == 7) {
        if (d > 16) pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 2, 7);
        else pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 1, 7);
        return;
    }
    switch ((d + 15) / 16) {
        case 4: pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 4, 4); break;
        case 3: pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 3, 4); break;
        case 2: pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 2, 4); break;
        default: pv_tile(p, prs, pcs, inv, v, vs_, out, os, n, i0, tail, 1, 4); break;
    }
}

/* a 16 x 16 block of floats transposed in registers: r[i] holds row i before, column i after */
static inline AVX512 __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* K^T (or V^T): d rows of np floats, 16 keys x 16 channels at a time transposed in registers (gathers
   are slow on AMD's Zen 4); columns past the last key 0 */
static inline AVX512 void transpose_keys(const float *k, long ks, float *kt, int n, int np, int d) {
    for (int j = 0; j < np; j += 16) {
        int keys = n - j < 16 ? n - j : 16;
        for (int c0 = 0; c0 < d; c0 += 16) {
            __mmask16 cm = first_lanes(d - c0);
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < keys ? _mm512_maskz_loadu_ps(cm, k + (long)(j + i) * ks + c0) : _mm512_setzero_ps();
            transpose16(r);
            for (int c = 0; c < 16 && c0 + c < d; c++) _mm512_store_ps(kt + (c0 + c) * np + j, r[c]);
        }
    }
}

/* rows i0..i0+3 for n > 64: logits tile by tile into s, then each row's softmax over s */
static AVX512 void long_rows(const float *q, long qs, const float *kt, int np, const float *mask, int n, int d,
                             int i0, float scale, float *s, float *inv) {
    int nv = np / 16, c0 = 0;
    for (; c0 + 4 <= nv; c0 += 4) qk_tile(q, qs, kt, np, mask, n, d, i0, c0, scale, s, 4);
    switch (nv - c0) {
        case 3: qk_tile(q, qs, kt, np, mask, n, d, i0, c0, scale, s, 3); break;
        case 2: qk_tile(q, qs, kt, np, mask, n, d, i0, c0, scale, s, 2); break;
        case 1: qk_tile(q, qs, kt, np, mask, n, d, i0, c0, scale, s, 1); break;
    }
    for (int r = 0; r < 4 && i0 + r < n; r++) {
        float *row = s + r * np;
        __m512 mx = _mm512_set1_ps(-__builtin_inff());
        for (int j = 0; j < np; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(row + j));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < np; j += 16) {
            __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_load_ps(row + j), m));
            _mm512_store_ps(row + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
}

/* training: rows i0..i0+R-1 (those < n) of the probabilities, s's rows times inv */
static inline AVX512 void store_probs(const float *s, int np, const float *inv, float *probs, int n, int i0, int R) {
    for (int r = 0; r < R && i0 + r < n; r++) {
        __m512 f = _mm512_set1_ps(inv[r]);
        for (int j = 0; j < n; j += 16)
            _mm512_mask_storeu_ps(probs + (long)(i0 + r) * n + j, first_lanes(n - j), _mm512_mul_ps(_mm512_load_ps(s + r * np + j), f));
    }
}

/* the next (window, head)'s q, k and v (q NULL: none), in the backward also dO (g) and P (p, rows of n),
   whose rows are prefetched while one computes */
struct next_item { const float *q, *k, *v, *g, *p; long qs, ks, vs, gs; };

/* rows i0..i0+rows-1 of the next item (n tokens, d channels a head) into the L1 cache. Inlined by
   force: as a call, GCC 12 takes a function that only prefetches for one without effects and deletes
   the calls */
static inline AVX512 __attribute__((always_inline)) void prefetch_next(const struct next_item *nx, int i0, int rows,
                                                                       int n, int d) {
    if (!nx->q) return;
    prefetch_rows(nx->q + (long)i0 * nx->qs, nx->qs, rows, d);
    prefetch_rows(nx->k + (long)i0 * nx->ks, nx->ks, rows, d);
    prefetch_rows(nx->v + (long)i0 * nx->vs, nx->vs, rows, d);
    if (nx->g) prefetch_rows(nx->g + (long)i0 * nx->gs, nx->gs, rows, d);
    if (nx->p) prefetch_rows(nx->p + (long)i0 * n, n, rows, n);
}

/* one (window, head): q, k, v, out point at its token 0, head column 0 */
static AVX512 void window_head(const float *q, long qs, const float *k, long ks, const float *v, long vs_,
                               const float *mask, float *out, long os, float *probs, int n, int d, float scale,
                               const struct next_item *nx) {
    int np = (n + 15) & ~15;
    float kt[MAXD * MAXN] __attribute__((aligned(64)));
    float s[7 * MAXN] __attribute__((aligned(64)));
    int nv = np / 16, nf = n / 16;
    float inv[7];
    if (n - 16 * nf <= 2 && nf >= 1 && nf <= 3 && n % 16 && d <= 32) {  /* 49 keys: 7-row tiles, the 49th apart */
        transpose_keys(k, ks, kt, 16 * nf, 16 * nf, d);
        for (int i0 = 0; i0 < n; i0 += 7) {
            prefetch_next(nx, i0, n - i0 < 7 ? n - i0 : 7, n, d);
            switch (nf) {
                case 3: qk_softmax_tail_tile(q, qs, k, ks, kt, mask, n, d, i0, scale, s, np, inv, 3); break;
                case 2: qk_softmax_tail_tile(q, qs, k, ks, kt, mask, n, d, i0, scale, s, np, inv, 2); break;
                default: qk_softmax_tail_tile(q, qs, k, ks, kt, mask, n, d, i0, scale, s, np, inv, 1); break;
            }
            if (probs) store_probs(s, np, inv, probs, n, i0, 7);
            pv_rows(s, np, 1, inv, v, vs_, out, os, n, i0, d, 7);
        }
        return;
    }
    transpose_keys(k, ks, kt, n, np, d);
    for (int i0 = 0; i0 < n; i0 += 4) {
        prefetch_next(nx, i0, n - i0 < 4 ? n - i0 : 4, n, d);
        switch (nv) {  /* n <= 64: one tile holds whole rows, softmax in registers */
            case 4: qk_softmax_tile(q, qs, kt, np, mask, n, d, i0, scale, s, inv, 4); break;
            case 3: qk_softmax_tile(q, qs, kt, np, mask, n, d, i0, scale, s, inv, 3); break;
            case 2: qk_softmax_tile(q, qs, kt, np, mask, n, d, i0, scale, s, inv, 2); break;
            case 1: qk_softmax_tile(q, qs, kt, np, mask, n, d, i0, scale, s, inv, 1); break;
            default: long_rows(q, qs, kt, np, mask, n, d, i0, scale, s, inv);
        }
        for (int r = n - i0; r < 4; r++)  /* rows past the last query: zeros, not stale stack values */
            for (int j = 0; j < np; j++) s[r * np + j] = 0.0f;
        if (probs) store_probs(s, np, inv, probs, n, i0, 4);  /* training: for the backward */
        pv_rows(s, np, 1, inv, v, vs_, out, os, n, i0, d, 4);
    }
}

/* the backward of one (window, head) with n <= 64, from the forward's probabilities P and the output
   gradient dO (g): dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(P dP)); dQ = scale dS K;
   dK = scale dS^T Q. With ds_out, dS (the logits' gradient, hence the mask's) is also written there. */
static AVX512 void window_head_backward(const float *q, long qs, const float *k, long ks, const float *v, long vs_,
                                        const float *p, const float *g, long gs, float *dq, long dqs, float *dk,
                                        long dks, float *dv, long dvs, float *ds_out, int n, int d, float scale,
                                        const struct next_item *nx) {
    int np = (n + 15) & ~15, nv = np / 16;
    float vt[MAXD * MAXNB] __attribute__((aligned(64)));
    float ds[MAXNB * MAXNB] __attribute__((aligned(64)));
    const float one[4] = {1.0f, 1.0f, 1.0f, 1.0f}, sc[4] = {scale, scale, scale, scale};
    transpose_keys(v, vs_, vt, n, np, d);
    for (int i0 = 0; i0 < n; i0 += 4) {
        __m512 acc[4][4];
        prefetch_next(nx, i0, n - i0 < 4 ? n - i0 : 4, n, d);
        switch (nv) {  /* dP rows i0..i0+3 = dO rows . V^T */
            case 4: qk_accumulate(acc, g, gs, vt, np, n, d, i0, 0, 4, 4); break;
            case 3: qk_accumulate(acc, g, gs, vt, np, n, d, i0, 0, 3, 4); break;
            case 2: qk_accumulate(acc, g, gs, vt, np, n, d, i0, 0, 2, 4); break;
            default: qk_accumulate(acc, g, gs, vt, np, n, d, i0, 0, 1, 4); break;
        }
        for (int r = 0; r < 4 && i0 + r < n; r++) {
            const float *prow = p + (long)(i0 + r) * n;
            __m512 pv[4], dot = _mm512_setzero_ps();
            for (int u = 0; u < nv; u++) {
                pv[u] = _mm512_maskz_loadu_ps(first_lanes(n - 16 * u), prow + 16 * u);
                dot = _mm512_fmadd_ps(pv[u], acc[r][u], dot);
            }
            __m512 dsum = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
            for (int u = 0; u < nv; u++) {
                __m512 dsv = _mm512_mul_ps(pv[u], _mm512_sub_ps(acc[r][u], dsum));  /* 0 past the last key */
                _mm512_store_ps(ds + (i0 + r) * np + 16 * u, dsv);
                if (ds_out)
                    _mm512_mask_storeu_ps(ds_out + (long)(i0 + r) * n + 16 * u, first_lanes(n - 16 * u), dsv);
            }
        }
    }
    for (int i0 = 0; i0 < n; i0 += 4) {
        pv_rows(ds + i0 * np, np, 1, sc, k, ks, dq, dqs, n, i0, d, 4);  /* dQ rows: dS rows . K */
        pv_rows(ds + i0, 1, np, sc, q, qs, dk, dks, n, i0, d, 4);       /* dK rows: dS columns . Q */
        pv_rows(p + i0, 1, n, one, g, gs, dv, dvs, n, i0, d, 4);        /* dV rows: P columns . dO */
    }
}

/* windows x heads items over PyTorch's OpenMP threads; q/k/v/g/dq/dk/dv strided as in
   swin_window_attention_f32; p: (windows, heads, n, n) probabilities; ds_out: NULL, or
   (windows, heads, n, n) to receive the logits' gradient. n <= 64. */
AVX512 void swin_window_attention_backward_f32(
        const float *q, long q_ws, long q_ts, long q_hs, const float *k, long k_ws, long k_ts, long k_hs,
        const float *v, long v_ws, long v_ts, long v_hs, const float *p, const float *g, long g_ws, long g_ts,
        long g_hs, float *dq, float *dk, float *dv, long d_ws, long d_ts, long d_hs, float *ds_out,
        long windows, long heads, long n, long d, float scale, int threads) {
    long total = windows * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < total; t++) {
        long w = t / heads, h = t % heads, o = w * d_ws + h * d_hs;
        struct next_item nx = {0, 0, 0, 0, 0, q_ts, k_ts, v_ts, g_ts};
        if (t + 1 < total) {
            long w1 = (t + 1) / heads, h1 = (t + 1) % heads;
            nx.q = q + w1 * q_ws + h1 * q_hs, nx.k = k + w1 * k_ws + h1 * k_hs, nx.v = v + w1 * v_ws + h1 * v_hs;
            nx.g = g + w1 * g_ws + h1 * g_hs, nx.p = p + (t + 1) * n * n;
        }
        window_head_backward(q + w * q_ws + h * q_hs, q_ts, k + w * k_ws + h * k_hs, k_ts, v + w * v_ws + h * v_hs,
                             v_ts, p + t * n * n, g + w * g_ws + h * g_hs, g_ts, dq + o, d_ts, dk + o, d_ts,
                             dv + o, d_ts, ds_out ? ds_out + t * n * n : 0, (int)n, (int)d, scale, &nx);
    }
}

/* GELU's backward with its forward recomputed, one pass: a = gelu(h) and g *= gelu'(h), where
   gelu(h) = h/2 (1 + erf(h/sqrt2)), gelu'(h) = (1 + erf(h/sqrt2))/2 + h exp(-h^2/2)/sqrt(2 pi).
   erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, PyTorch's vectorised erf uses the same
   formula), whose exp(-h^2/2) is also the derivative's: one exp per element instead of three. */
static inline AVX512 void gelu_grad_ps(__m512 x, __m512 gv, __m512 *a, __m512 *gout) {
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __m512 az = _mm512_abs_ps(z);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, _mm512_set1_ps(1.0f)));
    __m512 r = _mm512_set1_ps(1.061405429f);
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));  /* exp(-h^2/2) */
    __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, _mm512_set1_ps(1.0f));   /* erf(|z|) */
    __m512 erf = _mm512_mask_sub_ps(erf_abs, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ),
                                    _mm512_setzero_ps(), erf_abs);                      /* sign(z) erf(|z|) */
    __m512 cdf = _mm512_fmadd_ps(erf, _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));      /* (1 + erf) / 2 */
    *a = _mm512_mul_ps(x, cdf);
    __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(0.39894228040143268f), cdf);
    *gout = _mm512_mul_ps(gv, d);
}

static inline AVX512 void gelu_grad16(const float *h, float *g, float *a, __mmask16 m) {
    __m512 av, gv;
    gelu_grad_ps(_mm512_maskz_loadu_ps(m, h), _mm512_maskz_loadu_ps(m, g), &av, &gv);
    _mm512_mask_storeu_ps(a, m, av);
    _mm512_mask_storeu_ps(g, m, gv);
}

AVX512 void swin_gelu_grad_f32(const float *h, float *g, float *a, long n, int threads) {
    long blocks = (n + 1023) / 1024;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long end = (b + 1) * 1024 < n ? (b + 1) * 1024 : n;
        for (long i = b * 1024; i < end; i += 16) {
            gelu_grad16(h + i, g + i, a + i, first_lanes(end - i));
        }
    }
}

/* V2's cosine attention in training: F.normalize(x, dim=-1) over rows of d floats, times a factor per
   head (q's exp(logit_scale)), and its backward, one pass each (autograd's norm, divide, multiply,
   sum and addcmul on the strided q and k views cost ~5% of a SwinV2-T step). Row r = (i0, i1, i2, i3)
   of x is at x + i0 s0 + i1 s1 + i2 s2 + i3 s3, its factor scale[i2] (scale NULL: 1). Forward:
   y[r] = (x[r] / n[r]) * scale[i2], n[r] = max(||x[r]||, 1e-12), the reference's operations in its
   order; y and n contiguous in r's order. Backward, u = y / scale the unit row: dot[r] = <g[r], u[r]>
   (summed per head, the factor's gradient) and dx[r] = scale (g[r] - u[r] dot[r]) / n[r], or
   scale g[r] / n[r] where the norm was clamped. */
AVX512 void swin_unit_rows_f32(const float *x, long n0, long n1, long n2, long n3, long s0, long s1, long s2,
                               long s3, long d, const float *scale, float *y, float *nrm, int threads) {
    long rows = n0 * n1 * n2 * n3;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        long i3 = r % n3, t = r / n3, i2 = t % n2, i1 = t / n2 % n1, i0 = t / n2 / n1;
        const float *s = x + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
        __m512 sq = _mm512_setzero_ps();
        for (long c = 0; c < d; c += 16) {
            __m512 v = _mm512_maskz_loadu_ps(first_lanes(d - c), s + c);
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        float nr = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(_mm512_reduce_add_ps(sq))));
        nr = nr > 1e-12f ? nr : 1e-12f;
        __m512 nv = _mm512_set1_ps(nr), f = _mm512_set1_ps(scale ? scale[i2] : 1.0f);
        for (long c = 0; c < d; c += 16) {
            __mmask16 m = first_lanes(d - c);
            __m512 u = _mm512_div_ps(_mm512_maskz_loadu_ps(m, s + c), nv);
            _mm512_mask_storeu_ps(y + r * d + c, m, scale ? _mm512_mul_ps(u, f) : u);
        }
        nrm[r] = nr;
    }
}

AVX512 void swin_unit_rows_backward_f32(const float *g, long n0, long n1, long n2, long n3, long s0, long s1, long s2,
                                        long s3, const float *y, const float *nrm, const float *scale, float *dx,
                                        float *dots, long d, int threads) {
    long rows = n0 * n1 * n2 * n3;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {  /* g: strided as x in the forward (the gradient of a transposed view) */
        long i3 = r % n3, t = r / n3, i2 = t % n2, i1 = t / n2 % n1, i0 = t / n2 / n1;
        const float *gr = g + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3, *yr = y + r * d;
        float f = scale ? scale[i2] : 1.0f;
        __m512 dot = _mm512_setzero_ps();
        for (long c = 0; c < d; c += 16) {
            __mmask16 m = first_lanes(d - c);
            dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, gr + c), _mm512_maskz_loadu_ps(m, yr + c), dot);
        }
        float gu = _mm512_reduce_add_ps(dot) / f;  /* <g, u> */
        if (dots) dots[r] = gu;
        __m512 dv = _mm512_set1_ps(nrm[r] > 1e-12f ? gu / f : 0.0f), fv = _mm512_set1_ps(f / nrm[r]);
        for (long c = 0; c < d; c += 16) {  /* (f / n) (g - u <g, u>), u <g, u> = y <g, u> / f */
            __mmask16 m = first_lanes(d - c);
            __m512 v = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(m, yr + c), dv, _mm512_maskz_loadu_ps(m, gr + c));
            _mm512_mask_storeu_ps(dx + r * d + c, m, _mm512_mul_ps(v, fv));
        }
    }
}

/* LayerNorm of one row s (C floats) into o: o = (s - mean) * rstd * w + b, or o += that with acc;
   biased variance from a second pass over the row (in L1), as PyTorch's */
static inline AVX512 void ln_row(const float *s, float *o, const float *w, const float *b, long C, float eps, int acc) {
    __m512 sum = _mm512_setzero_ps();
    for (long j = 0; j < C; j += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(first_lanes(C - j), s + j));
    __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / (float)C);
    __m512 sq = _mm512_setzero_ps();
    for (long j = 0; j < C; j += 16) {
        __mmask16 m = first_lanes(C - j);
        __m512 dv = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, s + j), mean);
        sq = _mm512_fmadd_ps(dv, dv, sq);
    }
    __m512 rstd = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(_mm512_reduce_add_ps(sq) / (float)C + eps))));
    for (long j = 0; j < C; j += 16) {
        __mmask16 m = first_lanes(C - j);
        __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), mean), rstd);
        y = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, b + j));
        if (acc) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, o + j));
        _mm512_mask_storeu_ps(o + j, m, y);
    }
}

/* d[0..C) = s[0..C) (+ bias) */
static inline AVX512 void copy_row(float *d, const float *s, const float *bias, long C) {
    for (long j = 0; j < C; j += 16) {
        __mmask16 m = first_lanes(C - j);
        __m512 x = _mm512_maskz_loadu_ps(m, s + j);
        if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + j));
        _mm512_mask_storeu_ps(d + j, m, x);
    }
}

/* rows r = 0..rows-1 of C floats; the source row is src[idx[r]] (idx NULL: src[r]). With out: out[r]
   = LayerNorm(source row) (w, b, eps), or out[r] += it with acc. Then, with copy: copy[r] = source
   row (+ copy_bias); copy may be src itself (idx NULL), an in-place bias add after the norm read it. */
AVX512 void swin_rows_f32(const float *src, const long *idx, float *out, const float *w, const float *b, float eps,
                          int acc, float *copy, const float *copy_bias, long rows, long C, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *s = src + (idx ? idx[r] : r) * C;
        if (out) ln_row(s, out + r * C, w, b, C, eps, acc);
        if (copy) copy_row(copy + r * C, s, copy_bias, C);
    }
}

/* patch merging's gather (+ LayerNorm): (B, H, W, C) tokens -> (B * ceil(H/2) * ceil(W/2), 4C) rows, row
   (b, i, j) = the tokens (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) side by side (the official
   order; positions past an odd map's edge are zeros), then with w, b each row LayerNorm'd in place */
AVX512 void swin_merge_rows_f32(const float *x, long B, long H, long W, long C, const float *w, const float *b,
                                float eps, float *out, int threads) {
    long H2 = (H + 1) / 2, W2 = (W + 1) / 2, rows = B * H2 * W2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        long bi = r / (H2 * W2), i = r / W2 % H2, j = r % W2;
        float *o = out + r * 4 * C;
        for (int part = 0; part < 4; part++) {
            long y = 2 * i + (part & 1), xx = 2 * j + (part >> 1);
            if (y < H && xx < W)
                copy_row(o + part * C, x + ((bi * H + y) * W + xx) * C, 0, C);
            else
                for (long c = 0; c < C; c += 16) _mm512_mask_storeu_ps(o + part * C + c, first_lanes(C - c), _mm512_setzero_ps());
        }
        if (w) ln_row(o, o, w, b, 4 * C, eps, 0);
    }
}

/* dst[idx[r]] = src[r] for rows of C floats (idx holds no repeats) */
AVX512 void swin_scatter_rows_f32(float *dst, const long *idx, const float *src, long rows, long C, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) copy_row(dst + idx[r] * C, src + r * C, 0, C);
}

/* windows x heads items over PyTorch's OpenMP threads. q/k/v/out: element [w, i, h, c] at
   ptr[w * ws + i * ts + h * hs + c] (each with its own strides); mask: (mask_windows, heads, n, n),
   window w uses mask[w % mask_windows]; probs: NULL, or (windows, heads, n, n) to receive the
   probabilities (training). */
AVX512 void swin_window_attention_f32(const float *q, long q_ws, long q_ts, long q_hs,
                                      const float *k, long k_ws, long k_ts, long k_hs,
                                      const float *v, long v_ws, long v_ts, long v_hs,
                                      const float *mask, long mask_windows,
                                      float *out, long o_ws, long o_ts, long o_hs, float *probs,
                                      long windows, long heads, long n, long d, float scale, int threads) {
    long total = windows * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < total; t++) {
        long w = t / heads, h = t % heads;
        const float *mrow = mask + ((w % mask_windows) * heads + h) * n * n;
        struct next_item nx = {0, 0, 0, 0, 0, q_ts, k_ts, v_ts, 0};
        if (t + 1 < total) {
            long w1 = (t + 1) / heads, h1 = (t + 1) % heads;
            nx.q = q + w1 * q_ws + h1 * q_hs, nx.k = k + w1 * k_ws + h1 * k_hs, nx.v = v + w1 * v_ws + h1 * v_hs;
        }
        window_head(q + w * q_ws + h * q_hs, q_ts, k + w * k_ws + h * k_hs, k_ts, v + w * v_ws + h * v_hs, v_ts,
                    mrow, out + w * o_ws + h * o_hs, o_ts, probs ? probs + t * n * n : 0, (int)n, (int)d, scale, &nx);
    }
}

/* bf16 <-> fp32: a bf16 is the top half of an fp32; to bf16 rounds to nearest even (as PyTorch does),
   NaN kept quiet */
static inline AVX512 __m512 bf16_to_ps(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

static inline AVX512 void ps_to_bf16(uint16_t *y, __m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i even = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(even, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256((__m256i *)y, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/* n rows of d (a multiple of 16) bf16 values at row stride ts -> fp32 rows of d (contiguous); the
   next item's rows (nx: NULL for none, same strides) are asked into the L1 cache meanwhile */
static inline AVX512 __attribute__((always_inline)) void rows_to_ps(const uint16_t *x, long ts, float *y, int n, int d,
                                                                    const uint16_t *nx) {
    for (int i = 0; i < n; i++) {
        if (nx) for (int c = 0; c < d; c += 32) _mm_prefetch((const char *)(nx + i * ts + c), _MM_HINT_T0);
        for (int c = 0; c < d; c += 16) _mm512_store_ps(y + i * d + c, bf16_to_ps(x + i * ts + c));
    }
}

/* V2's cosine attention: rows y_i *= factor / max(||y_i||, 1e-12), fp32 (d a multiple of 16), as
   sdpa.split_qkv's inference path: the reciprocal of the clamped norm, times exp(logit_scale) for q */
static inline AVX512 void unit_rows(float *y, int n, int d, float factor) {
    for (int i = 0; i < n; i++) {
        __m512 sq = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            __m512 x = _mm512_load_ps(y + i * d + c);
            sq = _mm512_fmadd_ps(x, x, sq);
        }
        float nrm = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(_mm512_reduce_add_ps(sq))));
        __m512 r = _mm512_set1_ps((1.0f / (nrm > 1e-12f ? nrm : 1e-12f)) * factor);
        for (int c = 0; c < d; c += 16) _mm512_store_ps(y + i * d + c, _mm512_mul_ps(_mm512_load_ps(y + i * d + c), r));
    }
}

/* n rows of d fp32 values at row stride ts -> contiguous rows on the stack, the next item's rows
   (nx: NULL for none) asked into the L1 cache meanwhile */
static inline AVX512 __attribute__((always_inline)) void rows_copy(const float *x, long ts, float *y, int n, int d,
                                                                   const float *nx) {
    for (int i = 0; i < n; i++) {
        if (nx) for (int c = 0; c < d; c += 16) _mm_prefetch((const char *)(nx + i * ts + c), _MM_HINT_T0);
        for (int c = 0; c < d; c += 16) _mm512_store_ps(y + i * d + c, _mm512_loadu_ps(x + i * ts + c));
    }
}

/* swin_window_attention_f32 for V2's cosine attention, inference: each (window, head)'s q and k rows
   copied to the stack and unit-normalised there (q times qscale[head] = exp(logit_scale)), v read in
   place; d a multiple of 16. The logits are then (q/|q|) . (k/|k|) exp(logit_scale) + mask (scale 1
   here, as the reference passes). */
AVX512 void swin_window_attention_cos_f32(const float *q, long q_ws, long q_ts, long q_hs,
                                          const float *k, long k_ws, long k_ts, long k_hs,
                                          const float *v, long v_ws, long v_ts, long v_hs,
                                          const float *mask, long mask_windows,
                                          float *out, long o_ws, long o_ts, long o_hs, const float *qscale,
                                          long windows, long heads, long n, long d, float scale, int threads) {
    long total = windows * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < total; t++) {
        long w = t / heads, h = t % heads;
        float qf[MAXN * MAXD] __attribute__((aligned(64))), kf[MAXN * MAXD] __attribute__((aligned(64)));
        const float *nq = 0, *nk = 0;
        struct next_item nx = {0, 0, 0, 0, 0, q_ts, k_ts, v_ts, 0};
        if (t + 1 < total) {
            long w1 = (t + 1) / heads, h1 = (t + 1) % heads;
            nq = q + w1 * q_ws + h1 * q_hs, nk = k + w1 * k_ws + h1 * k_hs;
            nx.q = nq, nx.k = nk, nx.v = v + w1 * v_ws + h1 * v_hs;  /* (q, k again in window_head: cheap, cached) */
        }
        rows_copy(q + w * q_ws + h * q_hs, q_ts, qf, (int)n, (int)d, nq);
        rows_copy(k + w * k_ws + h * k_hs, k_ts, kf, (int)n, (int)d, nk);
        unit_rows(qf, (int)n, (int)d, qscale[h]);
        unit_rows(kf, (int)n, (int)d, 1.0f);
        window_head(qf, d, kf, d, v + w * v_ws + h * v_hs, v_ts, mask + ((w % mask_windows) * heads + h) * n * n,
                    out + w * o_ws + h * o_hs, o_ts, 0, (int)n, (int)d, scale, &nx);
    }
}

/* swin_window_attention_f32 on bf16 q/k/v and output (same element strides), computed in fp32: each
   (window, head)'s rows converted into fp32 on the stack, window_head run on them, the output rows
   rounded to bf16. The mask is fp32. d a multiple of 16. With qscale (V2, inference), q and k
   unit-normalised in fp32 first, q times qscale[head]; with probs (training), the fp32 probabilities. */
AVX512 void swin_window_attention_bf16(const uint16_t *q, long q_ws, long q_ts, long q_hs,
                                       const uint16_t *k, long k_ws, long k_ts, long k_hs,
                                       const uint16_t *v, long v_ws, long v_ts, long v_hs,
                                       const float *mask, long mask_windows,
                                       uint16_t *out, long o_ws, long o_ts, long o_hs,
                                       long windows, long heads, long n, long d, float scale, int threads,
                                       const float *qscale, float *probs) {
    long total = windows * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < total; t++) {
        long w = t / heads, h = t % heads;
        float qf[MAXN * MAXD] __attribute__((aligned(64))), kf[MAXN * MAXD] __attribute__((aligned(64)));
        float vf[MAXN * MAXD] __attribute__((aligned(64))), of[MAXN * MAXD] __attribute__((aligned(64)));
        const uint16_t *nq = 0, *nk = 0, *nv = 0;
        if (t + 1 < total) {
            long w1 = (t + 1) / heads, h1 = (t + 1) % heads;
            nq = q + w1 * q_ws + h1 * q_hs, nk = k + w1 * k_ws + h1 * k_hs, nv = v + w1 * v_ws + h1 * v_hs;
        }
        rows_to_ps(q + w * q_ws + h * q_hs, q_ts, qf, (int)n, (int)d, nq);
        rows_to_ps(k + w * k_ws + h * k_hs, k_ts, kf, (int)n, (int)d, nk);
        rows_to_ps(v + w * v_ws + h * v_hs, v_ts, vf, (int)n, (int)d, nv);
        if (qscale) {
            unit_rows(qf, (int)n, (int)d, qscale[h]);
            unit_rows(kf, (int)n, (int)d, 1.0f);
        }
        struct next_item none = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        window_head(qf, d, kf, d, vf, d, mask + ((w % mask_windows) * heads + h) * n * n, of, d,
                    probs ? probs + t * n * n : 0, (int)n, (int)d, scale, &none);
        uint16_t *o = out + w * o_ws + h * o_hs;
        for (long i = 0; i < n; i++)
            for (long c = 0; c < d; c += 16) ps_to_bf16(o + i * o_ts + c, _mm512_load_ps(of + i * d + c));
    }
}

/* swin_window_attention_backward_f32 on bf16 q/k/v, dO and dq/dk/dv (fp32 probabilities and dS): each
   (window, head)'s rows converted to fp32 on the stack (the next one's prefetched meanwhile), the fp32
   backward run there, the three gradients rounded once to bf16. d a multiple of 16, n <= MAXNB. */
AVX512 void swin_window_attention_backward_bf16(
        const uint16_t *q, long q_ws, long q_ts, long q_hs, const uint16_t *k, long k_ws, long k_ts, long k_hs,
        const uint16_t *v, long v_ws, long v_ts, long v_hs, const float *p, const uint16_t *g, long g_ws, long g_ts,
        long g_hs, uint16_t *dq, uint16_t *dk, uint16_t *dv, long d_ws, long d_ts, long d_hs, float *ds_out,
        long windows, long heads, long n, long d, float scale, int threads) {
    long total = windows * heads;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < total; t++) {
        long w = t / heads, h = t % heads, o = w * d_ws + h * d_hs;
        float qf[MAXNB * MAXD] __attribute__((aligned(64))), kf[MAXNB * MAXD] __attribute__((aligned(64)));
        float vf[MAXNB * MAXD] __attribute__((aligned(64))), gf[MAXNB * MAXD] __attribute__((aligned(64)));
        float dqf[MAXNB * MAXD] __attribute__((aligned(64))), dkf[MAXNB * MAXD] __attribute__((aligned(64)));
        float dvf[MAXNB * MAXD] __attribute__((aligned(64)));
        const uint16_t *nq = 0, *nk = 0, *nv = 0, *ng = 0;
        if (t + 1 < total) {
            long w1 = (t + 1) / heads, h1 = (t + 1) % heads;
            nq = q + w1 * q_ws + h1 * q_hs, nk = k + w1 * k_ws + h1 * k_hs, nv = v + w1 * v_ws + h1 * v_hs;
            ng = g + w1 * g_ws + h1 * g_hs;
        }
        rows_to_ps(q + w * q_ws + h * q_hs, q_ts, qf, (int)n, (int)d, nq);
        rows_to_ps(k + w * k_ws + h * k_hs, k_ts, kf, (int)n, (int)d, nk);
        rows_to_ps(v + w * v_ws + h * v_hs, v_ts, vf, (int)n, (int)d, nv);
        rows_to_ps(g + w * g_ws + h * g_hs, g_ts, gf, (int)n, (int)d, ng);
        struct next_item none = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        window_head_backward(qf, d, kf, d, vf, d, p + t * n * n, gf, d, dqf, d, dkf, d, dvf, d,
                             ds_out ? ds_out + t * n * n : 0, (int)n, (int)d, scale, &none);
        for (long i = 0; i < n; i++)
            for (long c = 0; c < d; c += 16) {
                ps_to_bf16(dq + o + i * d_ts + c, _mm512_load_ps(dqf + i * d + c));
                ps_to_bf16(dk + o + i * d_ts + c, _mm512_load_ps(dkf + i * d + c));
                ps_to_bf16(dv + o + i * d_ts + c, _mm512_load_ps(dvf + i * d + c));
            }
    }
}

/* swin_gelu_grad_f32 on bf16 h, g and a (n a multiple of 16): fp32 inside, each result rounded once */
AVX512 void swin_gelu_grad_bf16(const uint16_t *h, uint16_t *g, uint16_t *a, long n, int threads) {
    long blocks = (n + 1023) / 1024;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long end = (b + 1) * 1024 < n ? (b + 1) * 1024 : n;
        for (long i = b * 1024; i < end; i += 16) {
            __m512 av, gv;
            gelu_grad_ps(bf16_to_ps(h + i), bf16_to_ps(g + i), &av, &gv);
            ps_to_bf16(a + i, av);
            ps_to_bf16(g + i, gv);
        }
    }
}

#define MAXC 4096  /* channels a bf16 row kernel's row holds on the stack */

/* swin_rows_f32 on bf16 src, out and copy (C a multiple of 16, at most MAXC), in fp32: each source row
   read once into fp32, LayerNorm'd (added to out's row with acc), the copy with copy_bias; every result
   rounded once to bf16. w, b, copy_bias fp32. out or copy may be src itself (idx NULL). */
AVX512 void swin_rows_bf16(const uint16_t *src, const long *idx, uint16_t *out, const float *w, const float *b,
                           float eps, int acc, uint16_t *copy, const float *copy_bias, long rows, long C, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        float x[MAXC] __attribute__((aligned(64))), y[MAXC] __attribute__((aligned(64)));
        const uint16_t *s = src + (idx ? idx[r] : r) * C;
        for (long j = 0; j < C; j += 16) _mm512_store_ps(x + j, bf16_to_ps(s + j));
        if (out) {
            uint16_t *o = out + r * C;
            if (acc) for (long j = 0; j < C; j += 16) _mm512_store_ps(y + j, bf16_to_ps(o + j));
            ln_row(x, y, w, b, C, eps, acc);
            for (long j = 0; j < C; j += 16) ps_to_bf16(o + j, _mm512_load_ps(y + j));
        }
        if (copy) {
            uint16_t *c = copy + r * C;
            for (long j = 0; j < C; j += 16) {
                __m512 v = _mm512_load_ps(x + j);
                if (copy_bias) v = _mm512_add_ps(v, _mm512_loadu_ps(copy_bias + j));
                ps_to_bf16(c + j, v);
            }
        }
    }
}

/* dst[idx[r]] = src[r] for rows of C bf16 values (C a multiple of 16; idx holds no repeats) */
AVX512 void swin_scatter_rows_bf16(uint16_t *dst, const long *idx, const uint16_t *src, long rows, long C, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < C; j += 16)
            _mm256_storeu_si256((__m256i *)(dst + idx[r] * C + j), _mm256_loadu_si256((const __m256i *)(src + r * C + j)));
}
"""

_lock = threading.Lock()
_lib = None  # the loaded library, False once building or loading failed


def _cache_dir() -> Path:
    """$SWIN_CACHE_DIR, else ~/.cache/swin; without a home (a container's user with no passwd entry and
    no $HOME) a folder of this user's in the temporary directory."""
    if os.environ.get("SWIN_CACHE_DIR"):
        return Path(os.environ["SWIN_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "swin"
    except RuntimeError:
        return Path(tempfile.gettempdir()) / f"swin-cache-{os.getuid()}"


def intact(path: Path) -> bool:
    """True if the ELF file at ``path`` is whole: a linker writes the section header table last, so a
    file cut short (a half-copied cache) ends before it. Loading such a file kills the process (SIGBUS)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 64 or head[:5] != b"\x7fELF\x02" or head[5] != 1:  # 64-bit little-endian ELF
        return False
    shoff = int.from_bytes(head[0x28:0x30], "little")
    shentsize, shnum = int.from_bytes(head[0x3A:0x3C], "little"), int.from_bytes(head[0x3C:0x3E], "little")
    return size >= shoff + shentsize * shnum


CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def compile_source(source: str, so: Path) -> None:
    """Builds the shared library ``so`` from C ``source`` with ``$CC`` (default ``cc``; a command with
    arguments such as ``ccache gcc`` too) and CFLAGS."""
    src = so.with_suffix(".c")
    src.write_text(source)
    subprocess.run([*shlex.split(_compiler()), *CFLAGS, str(src), "-o", str(so)], check=True, capture_output=True,
                   timeout=120)


def _build() -> ctypes.CDLL | None:
    tag = hashlib.sha256((_SOURCE + _compiler() + " ".join(CFLAGS)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels_{tag}.so"
    if not intact(path):  # absent, or damaged: built (again)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            so = Path(tmp) / path.name
            compile_source(_SOURCE, so)
            os.replace(so, path)  # atomic: a concurrent build or a reader never sees half a file
    lib = load_library(path)
    return lib if lib.swin_cpu_ok() else None


def load_library(path: Path) -> ctypes.CDLL:
    """The built library at ``path``, its entry points' argument types set (benchmarks/cpu_ab.py loads
    two versions side by side this way)."""
    lib = ctypes.CDLL(str(path))
    f = lib.swin_window_attention_f32
    P, L = ctypes.c_void_p, ctypes.c_long
    f.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, P, L, P, L, L, L, P, L, L, L, L, ctypes.c_float, ctypes.c_int]
    f.restype = None
    b = lib.swin_window_attention_backward_f32
    b.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, P, P, L, L, L, P, P, P, L, L, L, P, L, L, L, L,
                  ctypes.c_float, ctypes.c_int]
    b.restype = None
    lib.swin_gelu_grad_f32.argtypes = [P, P, P, L, ctypes.c_int]
    lib.swin_gelu_grad_f32.restype = None
    lib.swin_rows_f32.argtypes = [P, P, P, P, P, ctypes.c_float, ctypes.c_int, P, P, L, L, ctypes.c_int]
    lib.swin_rows_f32.restype = None
    lib.swin_scatter_rows_f32.argtypes = [P, P, P, L, L, ctypes.c_int]
    lib.swin_scatter_rows_f32.restype = None
    lib.swin_merge_rows_f32.argtypes = [P, L, L, L, L, P, P, ctypes.c_float, P, ctypes.c_int]
    lib.swin_merge_rows_f32.restype = None
    if hasattr(lib, "swin_unit_rows_f32"):  # (an older build, loaded by benchmarks/cpu_ab.py, has none)
        lib.swin_unit_rows_f32.argtypes = [P, L, L, L, L, L, L, L, L, L, P, P, P, ctypes.c_int]
        lib.swin_unit_rows_f32.restype = None
        lib.swin_unit_rows_backward_f32.argtypes = [P, L, L, L, L, L, L, L, L, P, P, P, P, P, L, ctypes.c_int]
        lib.swin_unit_rows_backward_f32.restype = None
    if hasattr(lib, "swin_window_attention_cos_f32"):
        lib.swin_window_attention_cos_f32.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, P, L, P, L, L, L, P, L, L, L,
                                                      L, ctypes.c_float, ctypes.c_int]
        lib.swin_window_attention_cos_f32.restype = None
    if hasattr(lib, "swin_window_attention_bf16"):  # (an older build, loaded by benchmarks/cpu_ab.py, has none)
        lib.swin_window_attention_bf16.argtypes = [P, L, L, L, P, L, L, L, P, L, L, L, P, L, P, L, L, L, L, L, L, L,
                                                   ctypes.c_float, ctypes.c_int, P, P]
        lib.swin_window_attention_bf16.restype = None
        lib.swin_window_attention_backward_bf16.argtypes = b.argtypes
        lib.swin_window_attention_backward_bf16.restype = None
        lib.swin_gelu_grad_bf16.argtypes = [P, P, P, L, ctypes.c_int]
        lib.swin_gelu_grad_bf16.restype = None
        lib.swin_rows_bf16.argtypes = [P, P, P, P, P, ctypes.c_float, ctypes.c_int, P, P, L, L, ctypes.c_int]
        lib.swin_rows_bf16.restype = None
        lib.swin_scatter_rows_bf16.argtypes = [P, P, P, L, L, ctypes.c_int]
        lib.swin_scatter_rows_bf16.restype = None
    return lib


def available() -> bool:
    """True where the kernel is built and this CPU runs it (built on the first call)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                ok = os.environ.get("SWIN_CPU_KERNELS", "1") != "0" and platform.machine() in ("x86_64", "AMD64")
                try:
                    _lib = (_build() if ok else None) or False
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # no compiler, a failed
                    _lib = False                                                     # build, a read-only home
                    detail = getattr(e, "stderr", None) or b""
                    detail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else []
                    warnings.warn(f"swin: the CPU kernels could not be built ({e}{': ' + detail[0] if detail else ''}); "
                                  "CPU inference and training run on PyTorch's operators instead, correctly but slower. "
                                  "Set CC to a C compiler with OpenMP, or SWIN_CPU_KERNELS=0 to skip them quietly.",
                                  RuntimeWarning, stacklevel=2)
    return _lib is not False


def _exports(name: str) -> bool:
    """The kernels are built and the loaded library has entry point ``name`` (a library of an older
    revision, loaded by benchmarks/cpu_ab.py, may lack the newer ones: their callers then take PyTorch)."""
    return available() and hasattr(_lib, name)


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    """q, k, v: (windows, N, heads, d), any strides but a contiguous last dim; mask: (mw, heads, N, N)
    contiguous, window w using mask[w % mw] (mw = 1, the windows of one image, or all windows)."""
    windows, n, heads, d = q.shape
    return ((q.dtype == k.dtype == v.dtype == torch.float32 or bf16_eligible(q, k, v))
            and mask.dtype == torch.float32 and q.device.type == "cpu"
            and d <= 64 and n <= MAX_TOKENS and mask.is_contiguous() and mask.dim() == 4
            and mask.shape[1:] == (heads, n, n) and windows % mask.shape[0] == 0
            and all(t.shape == q.shape and t.stride(3) == 1 for t in (k, v))
            and q.stride(3) == 1 and available())


def bf16_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The bf16 form (inference: bf16 q/k/v and output, fp32 arithmetic and mask) takes heads whose
    width is a multiple of 16."""
    return q.dtype == k.dtype == v.dtype == torch.bfloat16 and mask_dtype(q.dtype, q.shape[1], q.shape[3]) == torch.float32


def mask_dtype(dtype: torch.dtype, n: int, d: int) -> torch.dtype:
    """The dtype :func:`window_attention` wants its mask in for ``dtype`` q/k/v of n tokens and d channels
    a head: fp32 where the kernel takes them (bf16 included), else ``dtype`` (for SDPA)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and d % 16 == 0 and d <= 64 and n <= MAX_TOKENS
                                  and _exports("swin_window_attention_bf16")):
        return torch.float32
    return dtype


def cosine_eligible(dtype: torch.dtype, d: int) -> bool:
    """Whether :func:`window_attention` can take V2's cosine attention (``cosine=``) for q/k/v of this
    dtype and d channels a head: fp32 or bf16, d a multiple of 16, in this build."""
    name = "swin_window_attention_cos_f32" if dtype == torch.float32 else "swin_window_attention_bf16"
    return d % 16 == 0 and dtype in (torch.float32, torch.bfloat16) and _exports(name)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     probs: bool = False, cosine: torch.Tensor | None = None):
    """softmax(scale * q k^T + mask) v per window and head -> (windows * N, heads * d), token rows;
    with ``probs``, also the (windows, heads, N, N) probabilities (for a backward pass). With
    ``cosine`` (V2, inference; (heads,) fp32 exp(logit_scale)): q and k are first unit-normalised
    in the kernel, q times cosine[head] (what ``sdpa.split_qkv`` does before SDPA; pass scale 1).

    q, k, v: (windows, N, heads, d); mask: (mw, heads, N, N) (see :func:`eligible`)."""
    windows, n, heads, d = q.shape
    if n > MAX_TOKENS or d > 64:  # the C stack buffers' sizes
        raise ValueError(f"window_attention takes windows of at most {MAX_TOKENS} tokens and heads of at most 64 "
                         f"channels, got {n} and {d}; check eligible first.")
    if cosine is not None:
        if probs or not cosine_eligible(q.dtype, d):
            raise ValueError("window_attention normalises q and k (cosine=) in inference only, for heads of a "
                             "multiple of 16 channels; normalise them first (sdpa.split_qkv) otherwise.")
        cosine = cosine.detach().float().contiguous()
    out = torch.empty(windows * n, heads * d, dtype=q.dtype)
    p = torch.empty(windows, heads, n, n, dtype=torch.float32) if probs else None  # fp32 for bf16 inputs too
    if q.dtype == torch.bfloat16:  # bf16 in and out, fp32 inside
        _lib.swin_window_attention_bf16(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                                        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                        mask.data_ptr(), mask.shape[0], out.data_ptr(), n * heads * d, heads * d, d,
                                        windows, heads, n, d, float(scale), torch.get_num_threads(), _ptr(cosine),
                                        _ptr(p))
        return (out, p) if probs else out
    if cosine is not None:
        _lib.swin_window_attention_cos_f32(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                           k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                                           v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                           mask.data_ptr(), mask.shape[0], out.data_ptr(), n * heads * d, heads * d,
                                           d, cosine.data_ptr(), windows, heads, n, d, float(scale),
                                           torch.get_num_threads())
        return out
    _lib.swin_window_attention_f32(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                   k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                                   v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                   mask.data_ptr(), mask.shape[0], out.data_ptr(), n * heads * d, heads * d, d,
                                   None if p is None else p.data_ptr(), windows, heads, n, d, float(scale),
                                   torch.get_num_threads())
    return (out, p) if probs else out


MAX_BACKWARD_TOKENS = 64  # the backward keeps one window-head's dS (N x N) on the stack: windows up to 8


def backward_eligible(q: torch.Tensor) -> bool:
    """q: (windows, N, heads, d). The backward kernel takes what the forward took, with at most 64
    tokens per window."""
    return (q.shape[1] <= MAX_BACKWARD_TOKENS and available()
            and (q.dtype == torch.float32 or _exports("swin_window_attention_backward_bf16")))


def window_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor,
                              grad: torch.Tensor, scale: float, mask_grad: bool = True, out=None):
    """Gradients of :func:`window_attention` from its probabilities: (dq, dk, dv), each (windows, N,
    heads, d), and (with ``mask_grad``) the logits' gradient (windows, heads, N, N), which summed over
    the windows sharing a mask is the mask's; else None.

    q, k, v: as the forward's; probs: (windows, heads, N, N); grad: (windows, N, heads, d), last dim
    contiguous. ``out``: three (windows, N, heads, d) tensors with the same strides, last dim
    contiguous, to write dq, dk, dv into (e.g. the views of one qkv-layout gradient); by default
    three new contiguous ones."""
    windows, n, heads, d = q.shape
    if n > MAX_BACKWARD_TOKENS or d > 64:  # the C stack buffers' sizes
        raise ValueError(f"window_attention_backward takes windows of at most {MAX_BACKWARD_TOKENS} tokens and "
                         f"heads of at most 64 channels, got {n} and {d}; check backward_eligible first.")
    if out is None:
        dq, dk, dv = (torch.empty(windows, n, heads, d, dtype=q.dtype) for _ in range(3))
    else:
        dq, dk, dv = out
        if not (dq.shape == dk.shape == dv.shape == q.shape and dq.stride() == dk.stride() == dv.stride()
                and dq.stride(3) == 1 and dq.dtype == q.dtype):
            raise ValueError("window_attention_backward: out must be three tensors of q's shape and dtype with "
                             "the same strides and a contiguous last dim.")
    ds = torch.empty(windows, heads, n, n, dtype=torch.float32) if mask_grad else None
    probs = probs.contiguous()
    if q.dtype == torch.bfloat16:
        if not (k.dtype == v.dtype == grad.dtype == torch.bfloat16 and probs.dtype == torch.float32 and d % 16 == 0
                and _exports("swin_window_attention_backward_bf16")):
            raise ValueError("window_attention_backward on bf16 takes bf16 q, k, v and gradient, fp32 "
                             "probabilities and heads of a multiple of 16 channels; check backward_eligible first.")
        fn = _lib.swin_window_attention_backward_bf16
    else:
        fn = _lib.swin_window_attention_backward_f32
    fn(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), probs.data_ptr(),
        grad.data_ptr(), grad.stride(0), grad.stride(1), grad.stride(2),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dq.stride(0), dq.stride(1), dq.stride(2),
        None if ds is None else ds.data_ptr(), windows, heads, n, d, float(scale), torch.get_num_threads())
    return dq, dk, dv, ds


def rows_eligible(*tensors: torch.Tensor) -> bool:
    """The row kernels take fp32 CPU tensors, contiguous (None entries are skipped)."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
               for t in tensors) and available()


MAX_BF16_CHANNELS = 4096  # the bf16 row kernels' stack rows (MAXC)


def rows_bf16_eligible(C: int, *tensors: torch.Tensor) -> bool:
    """The bf16 row kernels take bf16 CPU tensors of C channels a row (a multiple of 16, at most
    MAX_BF16_CHANNELS), contiguous (None entries skipped); they compute in fp32."""
    return (C % 16 == 0 and C <= MAX_BF16_CHANNELS
            and all(t is None or (t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous())
                    for t in tensors)
            and _exports("swin_rows_bf16"))


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def norm_rows(src: torch.Tensor, norm: torch.nn.LayerNorm | None, out: torch.Tensor | None = None, *,
              index: torch.Tensor | None = None, accumulate: bool = False, copy: torch.Tensor | None = None,
              copy_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Row r's source is ``src[index[r]]`` (``src[r]`` without an index; the kernel does not check the
    index's range: the callers build it), C = src.shape[1] channels. With ``norm``: the rows'
    LayerNorm, returned: written into ``out``, or added to it with ``accumulate`` (``out`` returned);
    without ``accumulate`` the PyTorch path may return a new tensor instead of writing ``out``. Then,
    with ``copy``: ``copy[r] = source (+ copy_bias)``. Without an index, ``out`` and ``copy`` may be
    ``src`` itself (an in-place norm, or a bias add after the norm has read the row). One pass of
    the C kernel for fp32 and bf16 (the gather, the norm and the bias add that the chunked inference path
    does around each product; bf16 computed in fp32, each result rounded once); PyTorch's ops otherwise
    (:func:`norm_rows_reference`)."""
    index = None if index is None else index.contiguous()
    rows = src.shape[0] if index is None else index.shape[0]
    C = src.shape[1]
    w = b = None
    if norm is not None:
        w, b = norm.weight, norm.bias
    shapes_ok = ((index is None or index.dtype == torch.int64)
                 and (norm is None or (out is not None and w is not None and b is not None and w.numel() == C)))
    if shapes_ok and src.dtype == torch.bfloat16 and rows_bf16_eligible(C, src, out, copy):
        w32, b32, bias32 = _fp32(w), _fp32(b), _fp32(copy_bias)  # held until the call returns
        _lib.swin_rows_bf16(src.data_ptr(), _ptr(index), _ptr(out if norm is not None else None), _ptr(w32),
                            _ptr(b32), float(norm.eps) if norm is not None else 0.0, int(accumulate), _ptr(copy),
                            _ptr(bias32), rows, C, torch.get_num_threads())
        return None if norm is None else out
    if not (shapes_ok and rows_eligible(src, out, copy, copy_bias, w, b)):
        return norm_rows_reference(src, norm, out, index=index, accumulate=accumulate, copy=copy, copy_bias=copy_bias)
    _lib.swin_rows_f32(src.data_ptr(), None if index is None else index.data_ptr(),
                       None if norm is None else out.data_ptr(), None if w is None else w.data_ptr(),
                       None if b is None else b.data_ptr(), float(norm.eps) if norm is not None else 0.0,
                       int(accumulate), None if copy is None else copy.data_ptr(),
                       None if copy_bias is None else copy_bias.data_ptr(), rows, C, torch.get_num_threads())
    return None if norm is None else out


def norm_rows_reference(src, norm, out=None, *, index=None, accumulate=False, copy=None, copy_bias=None):
    """:func:`norm_rows` with PyTorch's ops (any dtype, any CPU), as few passes as they allow."""
    if index is None:
        rows = src
    else:
        rows = src.index_select(0, index) if copy is None else torch.index_select(src, 0, index, out=copy)
    y = None
    if norm is not None:
        y = torch.nn.functional.layer_norm(rows, (src.shape[1],), norm.weight, norm.bias, norm.eps)
        if accumulate:
            y = out.add_(y)
    if copy is not None:
        if rows.data_ptr() != copy.data_ptr():
            torch.add(rows, copy_bias, out=copy) if copy_bias is not None else copy.copy_(rows)
        elif copy_bias is not None:
            copy.add_(copy_bias)
    return y


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[index[r]] = src[r]`` (``dst.index_copy_(0, index, src)``), rows of fp32 or bf16 by the C
    kernel (``index`` in range and without repeats: not checked)."""
    index = index.contiguous()
    if not (index.dtype == torch.int64 and dst.shape[1:] == src.shape[1:] and dst.dim() == 2):
        dst.index_copy_(0, index, src)
    elif rows_eligible(dst, src):
        _lib.swin_scatter_rows_f32(dst.data_ptr(), index.data_ptr(), src.data_ptr(), index.shape[0],
                                   dst.shape[1], torch.get_num_threads())
    elif rows_bf16_eligible(dst.shape[1], dst, src):
        _lib.swin_scatter_rows_bf16(dst.data_ptr(), index.data_ptr(), src.data_ptr(), index.shape[0],
                                    dst.shape[1], torch.get_num_threads())
    else:
        dst.index_copy_(0, index, src)


def merge_rows(x: torch.Tensor, norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """Patch merging's gather: (B, H, W, C) -> (B * ceil(H/2) * ceil(W/2), 4C) rows, each 2 x 2
    neighbourhood's tokens side by side in the official order (0,0), (1,0), (0,1), (1,1), zeros past
    an odd map's edge; with ``norm`` each row LayerNorm'd (V1 norms before the reduction). One pass
    of the C kernel for a contiguous fp32 map; :func:`merge_rows_reference` otherwise."""
    w = b = None
    if norm is not None:
        w, b = norm.weight, norm.bias
    if not (rows_eligible(x, w, b) and x.dim() == 4 and (norm is None or (w is not None and b is not None
                                                                          and w.numel() == 4 * x.shape[3]))):
        return merge_rows_reference(x, norm)
    B, H, W, C = x.shape
    out = torch.empty(B * ((H + 1) // 2) * ((W + 1) // 2), 4 * C, dtype=x.dtype)
    _lib.swin_merge_rows_f32(x.data_ptr(), B, H, W, C, None if w is None else w.data_ptr(),
                             None if b is None else b.data_ptr(), float(norm.eps) if norm is not None else 0.0,
                             out.data_ptr(), torch.get_num_threads())
    return out


def merge_rows_reference(x: torch.Tensor, norm=None) -> torch.Tensor:
    """:func:`merge_rows` with PyTorch's ops (the model's own gather, ``windows.merge_2x2``)."""
    rows = windows.merge_2x2(x)
    rows = rows.reshape(-1, rows.shape[-1])
    return rows if norm is None else torch.nn.functional.layer_norm(rows, (rows.shape[1],), norm.weight, norm.bias, norm.eps)


def unit_rows_eligible(x: torch.Tensor) -> bool:
    """fp32 CPU rows (the last dim contiguous) under at most four outer dims, outside torch.compile
    (which traces the PyTorch form): :func:`unit_rows` takes them."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and 1 <= x.dim() <= 5 and x.shape[-1] > 0
            and x.stride(-1) == 1 and not torch.compiler.is_compiling() and _exports("swin_unit_rows_f32"))


def _outer(x: torch.Tensor) -> tuple[list, list]:
    """x's dims but the last, padded in front to four, and their strides."""
    pad = 5 - x.dim()
    return [1] * pad + list(x.shape[:-1]), [0] * pad + list(x.stride()[:-1])


def unit_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.normalize(x, dim=-1)`` (times ``scale[h]``, h the index along dim -3, when given: fp32, one
    per head) in one pass over fp32 rows of any strides (see :func:`unit_rows_eligible`): (y, n), y
    contiguous of x's shape, n the (..., 1) clamped norms max(||x||, 1e-12) (for
    :func:`unit_rows_backward`)."""
    outer, strides = _outer(x)
    y = torch.empty(x.shape, dtype=x.dtype)
    n = torch.empty(*x.shape[:-1], 1, dtype=x.dtype)
    if scale is not None:
        scale = scale.detach().float().contiguous()
        if x.dim() < 3 or scale.numel() != x.shape[-3]:
            raise ValueError(f"unit_rows takes one scale per index of dim -3 of x, got {scale.numel()} for shape "
                             f"{tuple(x.shape)}.")
    _lib.swin_unit_rows_f32(x.data_ptr(), *outer, *strides, x.shape[-1], _ptr(scale), y.data_ptr(), n.data_ptr(),
                            torch.get_num_threads())
    return y, n


def unit_rows_backward(g: torch.Tensor, y: torch.Tensor, n: torch.Tensor, scale: torch.Tensor | None = None):
    """From ``g`` at :func:`unit_rows`' output y (norms n, factors ``scale``): (dx, dscale). dx, y's
    shape and contiguous: scale (g - u <g, u>) / n per row, u = y / scale the unit row (scale g / n
    where the norm was clamped); dscale: <g, u> summed over the rows of each index of dim -3 (None
    without scale). One pass; g may have any strides with a contiguous last dim (as the gradient of
    the transposed q and k comes), read in place."""
    if g.stride(-1) != 1 or g.dtype != y.dtype:
        g = g.contiguous().to(y.dtype)
    outer, strides = _outer(g)
    dx = torch.empty(y.shape, dtype=y.dtype)
    dots = None if scale is None else torch.empty(n.numel(), dtype=torch.float32)
    if scale is not None:
        scale = scale.detach().float().contiguous()
    _lib.swin_unit_rows_backward_f32(g.data_ptr(), *outer, *strides, y.data_ptr(), n.data_ptr(), _ptr(scale),
                                     dx.data_ptr(), _ptr(dots), y.shape[-1], torch.get_num_threads())
    return dx, None if dots is None else dots.view(outer).sum((0, 1, 3))


def gelu_grad_eligible(h: torch.Tensor, g: torch.Tensor) -> bool:
    """fp32, or bf16 (autocast training; a multiple of 16 elements), CPU, contiguous, one shape."""
    return ((h.dtype == g.dtype == torch.float32 or (h.dtype == g.dtype == torch.bfloat16 and h.numel() % 16 == 0))
            and h.device.type == "cpu" and h.shape == g.shape and h.is_contiguous() and g.is_contiguous()
            and _exports("swin_gelu_grad_bf16" if h.dtype == torch.bfloat16 else "swin_gelu_grad_f32"))


def gelu_and_grad_(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """GELU's forward and backward in one pass over fp32 or bf16 CPU tensors: returns ``F.gelu(h)``
    and overwrites ``g`` with ``torch.ops.aten.gelu_backward(g, h)`` (both to ~2e-7 in fp32, see the C
    source; bf16 computed in fp32 and rounded once)."""
    a = torch.empty_like(h)
    fn = _lib.swin_gelu_grad_bf16 if h.dtype == torch.bfloat16 else _lib.swin_gelu_grad_f32
    fn(h.data_ptr(), g.data_ptr(), a.data_ptr(), h.numel(), torch.get_num_threads())
    return a
