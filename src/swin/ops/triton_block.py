"""Inference: each half of a Swin block as one Triton kernel (backend "fused").

    attention half, one program per window:   V1 x + proj(attention(LN1(x)))   V2 x + LN1(proj(attention(x)))
    MLP half, one program per tile of tokens: V1 x + fc2(GELU(fc1(LN2(x))))    V2 x + LN2(fc2(GELU(fc1(x))))

Why. With separate kernels the attention half of a block moves ~14C values per token: LayerNorm
reads C and writes C, the qkv product writes 3C, attention reads 3C and writes C, the output
projection reads C and writes C, and the residual add reads 2C and writes C; the MLP half ~19C
more (fc1 writes 4C, GELU reads and writes 4C, fc2 reads 4C). Here each half reads C and writes C.
The attention program loads its window's tokens from the (B, H, W, C) map, normalises them,
multiplies them by the qkv weight head by head, attends (relative position bias and shift mask
added in registers, as in ``triton_window.py``), accumulates each head's output times its slice of
the projection weight, adds the bias and the residual, and stores the window's tokens. The cyclic
shift, the padding and the window partition are index arithmetic; padded tokens enter attention as
zeros, as the reference pads after norm1 (V1) or pads the raw map (V2). The MLP program keeps its
tile's (tokens, 4C) hidden layer in registers, 64 columns at a time, and never writes it.
Intermediate results are rounded to the compute dtype where the separate kernels' outputs are.

Scope: inference (nothing to differentiate), eval mode, CUDA (or the Triton interpreter), windows
of up to 64 tokens, C <= 128 (the first stage of Swin-T/S/B: 69% of Swin-T's token-blocks), plain
LayerNorm/Linear/GELU modules without hooks (see :func:`eligible`). Elsewhere the block runs its
usual path. The backend is opt-in
(``backend="fused"``; attention otherwise as "triton"). Timed alone on an H200 (stop 12, b256 bf16,
``benchmarks/kernel_bench.py``): the MLP half 1.69x the separate calls, the attention half 1.00x;
``swin bench --dtype bf16 --impls ours+cast+compile,ours-fused+cast+compile`` times the whole model.

The spec is the block's reference path; tests/triton_interpret_check.py and the CUDA tests compare
them (fp32 <= 1e-4, bf16/fp16 <= 1e-2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import windows as W
from .triton_window import (_bias_tile, _choose, _device_of, _dot, _logits, _position_bias, _shape_key, _token_offsets,
                            _unit_rows)

MAX_CHANNELS = 128  # wider tiles spill (sm_90: 270-1300 bytes per thread at C = 192/256)


@triton.jit
def _layer_norm(x, w_ptr, b_ptr, cc, cmask, C, eps):
    """Row-wise LayerNorm of a (rows, BLOCK_C) fp32 tile whose columns past C are zero."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    g = tl.load(w_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * g[None, :] + b[None, :]


@triton.jit
def _block_kernel(X, LN_W, LN_B, QKV_W, QKV_B, BIAS, SCALE, PROJ_W, PROJ_B, OUT,
                  nW, nWx, Hp, Wp, H, W, shift, scale, eps, C, sxb, sxh, sxw, sob, soh, sow,
                  HEADS: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, N: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                  HAS_MASK: tl.constexpr, MASK_PAD: tl.constexpr, IEEE: tl.constexpr, COSINE: tl.constexpr,
                  POST_NORM: tl.constexpr, HAS_QKV_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    b, t, valid, ys, xs, yo, xo, inside = _token_offsets(pid, nW, nWx, Hp, Wp, H, W, shift, WIN, N, BLOCK)
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    io = inside[:, None] & cmask[None, :]
    xptr = X + b.to(tl.int64) * sxb + yo.to(tl.int64)[:, None] * sxh + xo[:, None] * sxw + cc[None, :]
    a = tl.load(xptr, mask=io, other=0.0).to(tl.float32)  # padded and out-of-window rows: zeros
    if not POST_NORM:  # V1 attends to LN1(x); the reference pads after norm1, so padding stays zero
        a = tl.where(inside[:, None], _layer_norm(a, LN_W, LN_B, cc, cmask, C, eps), 0.0)
    ty = QKV_W.dtype.element_ty
    a = a.to(ty)
    wmask = cmask[:, None] & dmask[None, :]
    acc = tl.zeros([BLOCK, BLOCK_C], dtype=tl.float32)
    for h in range(HEADS):
        # this head's columns of the qkv product: (BLOCK_C, BLOCK_D) slices of the (3C, C) weight
        wcol = QKV_W + (h * D + dd)[None, :] * C + cc[:, None]
        q = _dot(a, tl.load(wcol, mask=wmask, other=0.0), IEEE)
        k = _dot(a, tl.load(wcol + C * C, mask=wmask, other=0.0), IEEE)
        v = _dot(a, tl.load(wcol + 2 * C * C, mask=wmask, other=0.0), IEEE)
        if HAS_QKV_BIAS:
            q += tl.load(QKV_B + h * D + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
            k += tl.load(QKV_B + C + h * D + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
            v += tl.load(QKV_B + 2 * C + h * D + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
        # rounded to the compute dtype, as the separate qkv product's output is
        q, k, v = q.to(ty).to(tl.float32), k.to(ty).to(tl.float32), v.to(ty)
        hs = scale
        if COSINE:  # V2: cosine attention, exp(logit_scale) per head
            q, _ = _unit_rows(q)
            k, _ = _unit_rows(k)
            hs = tl.load(SCALE + h)
        s, _ = _logits(q.to(ty), k.to(ty), _bias_tile(BIAS, h, N, BLOCK), valid, ys, xs, inside, Hp, Wp, shift, hs,
                       WIN, HAS_MASK, MASK_PAD, IEEE)
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        o = _dot(p.to(ty), v, IEEE).to(ty)  # (BLOCK, BLOCK_D): this head's attention output
        # its contribution to the output projection: o times the (BLOCK_D, BLOCK_C) slice of proj^T
        wp = tl.load(PROJ_W + cc[None, :] * C + (h * D + dd)[:, None], mask=dmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += _dot(o, wp, IEEE)
    y = acc + tl.load(PROJ_B + cc, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y.to(ty).to(tl.float32)  # rounded as the separate projection's output is
    if POST_NORM:
        y = _layer_norm(y, LN_W, LN_B, cc, cmask, C, eps)
    x = tl.load(xptr, mask=io, other=0.0).to(tl.float32)  # the residual, read again (L2) to spare registers
    optr = OUT + b.to(tl.int64) * sob + yo.to(tl.int64)[:, None] * soh + xo[:, None] * sow + cc[None, :]
    tl.store(optr, (x + y).to(OUT.dtype.element_ty), mask=io)


# sm_90, bf16, Swin-T stage 1 (benchmarks/triton_resources.py): 8 warps, the head loop's weight loads
# pipelined (2 stages): 238-250 registers, no spills, 106 KB shared memory, one program per SM; not
# pipelined: 255 (V2 spills 264 bytes), 41 KB; 4 warps: 255 with 104-136 bytes spilled, two per SM.
# Timed once per input signature on the GPU, as triton_window's launches. The unpipelined 8-warp launch
# (num_stages=1) is gone: on an H200 (Triton 3.6, stop 13, benchmarks/fused_probe.py) it, and no other
# launch of either kernel, stopped the GPU with "an illegal memory access" at 56 x 56 and 56 x 62,
# shifted and not, with an fp32 input under bf16 autocast; the interpreter's bounds check finds every
# access of that launch inside its tensors, so it is taken for a miscompilation.
BLOCK_CONFIGS = (dict(num_warps=8, num_stages=2), dict(num_warps=4, num_stages=2))


@triton.jit
def _mlp_kernel(X, LN_W, LN_B, W1, B1, W2, B2, OUT, M, C, HID, eps,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
                POST_NORM: tl.constexpr):
    """Rows m0..m0+BLOCK_M of the (M, C) token matrix: x + fc2(GELU(fc1(LN2(x)))) (V1) or
    x + LN2(fc2(GELU(fc1(x)))) (V2); the (BLOCK_M, 4C) hidden layer lives in registers, BLOCK_H
    columns at a time, and is never written."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    io = rmask[:, None] & cmask[None, :]
    xptr = X + rows.to(tl.int64)[:, None] * C + cc[None, :]
    a = tl.load(xptr, mask=io, other=0.0).to(tl.float32)
    if not POST_NORM:
        a = _layer_norm(a, LN_W, LN_B, cc, cmask, C, eps)
    ty = W1.dtype.element_ty
    a = a.to(ty)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    jj = tl.arange(0, BLOCK_H)
    for j in range(0, HID, BLOCK_H):
        hmask = (j + jj) < HID
        # fc1's columns j..j+BLOCK_H: a (BLOCK_C, BLOCK_H) slice of the (4C, C) weight, transposed
        w1 = tl.load(W1 + (j + jj)[None, :] * C + cc[:, None], mask=cmask[:, None] & hmask[None, :], other=0.0)
        h = _dot(a, w1, IEEE) + tl.load(B1 + j + jj, mask=hmask, other=0.0).to(tl.float32)[None, :]
        h = h.to(ty).to(tl.float32)  # rounded as fc1's output is
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # exact (erf) GELU
        # fc2's rows for those hidden units: a (BLOCK_H, BLOCK_C) slice of the (C, 4C) weight, transposed
        w2 = tl.load(W2 + cc[None, :] * HID + (j + jj)[:, None], mask=hmask[:, None] & cmask[None, :], other=0.0)
        acc += _dot(h.to(ty), w2, IEEE)
    y = acc + tl.load(B2 + cc, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y.to(ty).to(tl.float32)  # rounded as fc2's output is
    if POST_NORM:
        y = _layer_norm(y, LN_W, LN_B, cc, cmask, C, eps)
    x = tl.load(xptr, mask=io, other=0.0).to(tl.float32)
    tl.store(OUT + rows.to(tl.int64)[:, None] * C + cc[None, :], (x + y).to(OUT.dtype.element_ty), mask=io)


# sm_90, bf16, Swin-T stage 1 (C = 96, 4C = 384): 128 tokens at 8 warps 255 registers, 32 tokens at 4 warps
# 232 (two programs per SM), 64 at 8 warps 198; none spills; 45-115 KB of shared memory. Timed as above.
MLP_CONFIGS = (dict(num_warps=8, num_stages=2, block_m=128), dict(num_warps=4, num_stages=2, block_m=32),
               dict(num_warps=8, num_stages=3, block_m=64))


@torch.library.custom_op("swin::mlp_half", mutates_args=())
def _mlp_op(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, eps: float, post_norm: bool) -> torch.Tensor:
    """(..., C) x -> x + the MLP half of a block (see :func:`_mlp_kernel`). Weights in the compute
    dtype, biases and LayerNorm parameters in fp32; output in x's dtype."""
    C, HID = x.shape[-1], w1.shape[0]
    M = x.numel() // C
    out = torch.empty_like(x)

    def launch(config):
        _mlp_kernel[(triton.cdiv(M, config["block_m"]),)](
            x, ln_w, ln_b, w1, b1, w2, b2, out, M, C, HID, eps, BLOCK_M=config["block_m"],
            BLOCK_C=max(16, triton.next_power_of_2(C)), BLOCK_H=64, IEEE=w1.dtype == torch.float32,
            POST_NORM=post_norm, num_warps=config["num_warps"], num_stages=config["num_stages"])

    with _device_of(x):
        _choose("mlp", (_shape_key(x.shape), x.dtype, w1.dtype, post_norm), MLP_CONFIGS, launch, x.is_cuda)
    return out


@_mlp_op.register_fake
def _(x, ln_w, ln_b, w1, b1, w2, b2, eps, post_norm):
    return torch.empty_like(x)


@torch.library.custom_op("swin::attention_half", mutates_args=())
def _block_op(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, qkv_w: torch.Tensor,
              qkv_b: Optional[torch.Tensor], bias: torch.Tensor, logit: Optional[torch.Tensor], proj_w: torch.Tensor,
              proj_b: torch.Tensor, heads: int, window: int, shift: int, mask_pad: bool, scale: float, eps: float,
              post_norm: bool) -> torch.Tensor:
    """(B, H, W, C) x -> x + attention half (see the module docstring). Weights in the compute dtype,
    qkv_b/proj_b/ln_w/ln_b/bias/logit in fp32; output in x's dtype."""
    B, H, Wd, C = x.shape
    Hp, Wp = W.padded_size(H, Wd, window)
    nWx = Wp // window
    nW = (Hp // window) * nWx
    D, N = C // heads, window * window
    out = torch.empty_like(x)
    meta = dict(HEADS=heads, D=D, WIN=window, N=N, BLOCK=max(16, triton.next_power_of_2(N)),
                BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_C=max(16, triton.next_power_of_2(C)),
                HAS_MASK=shift > 0 or mask_pad, MASK_PAD=mask_pad, IEEE=qkv_w.dtype == torch.float32,
                COSINE=logit is not None, POST_NORM=post_norm, HAS_QKV_BIAS=qkv_b is not None)

    def launch(config):
        _block_kernel[(B * nW,)](
            x, ln_w, ln_b, qkv_w, proj_b if qkv_b is None else qkv_b, bias, bias if logit is None else logit,
            proj_w, proj_b, out, nW, nWx, Hp, Wp, H, Wd, shift, scale, eps, C, x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2), num_warps=config["num_warps"],
            num_stages=config["num_stages"], **meta)

    with _device_of(x):
        _choose("block", (_shape_key(x.shape), x.dtype, qkv_w.dtype, heads, window, shift > 0, mask_pad, post_norm),
                BLOCK_CONFIGS, launch, x.is_cuda)
    return out


@_block_op.register_fake
def _(x, ln_w, ln_b, qkv_w, qkv_b, bias, logit, proj_w, proj_b, heads, window, shift, mask_pad, scale, eps,
      post_norm):
    return torch.empty_like(x)


def eligible(blk, x: torch.Tensor) -> bool:
    """True when :func:`attention_half` computes what ``blk``'s attention half computes: backend
    "fused", nothing to differentiate, eval mode, CUDA (or the interpreter), window <= 8,
    C <= MAX_CHANNELS, plain LayerNorm and Linear layers with their biases and no hooks anywhere in the block."""
    from . import _INTERPRET, autocast_dtype, block_dropout_active, has_hooks, is_plain

    attn = blk.attn
    if attn.backend != "fused" or blk.training or block_dropout_active(blk) or not (x.is_cuda or _INTERPRET):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in blk.parameters())):
        return False
    H, Wd, C = x.shape[1], x.shape[2], x.shape[3]
    window, _ = W.window_and_shift(H, Wd, blk.window_size, blk.shift_size)
    dtype = autocast_dtype(x.device.type) or x.dtype
    return (window * window <= 64 and C <= MAX_CHANNELS and attn.head_dim >= 16
            and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and type(blk.norm1) is torch.nn.LayerNorm and _affine(blk.norm1)
            and is_plain(attn.qkv, torch.nn.Linear) and is_plain(attn.proj, torch.nn.Linear)
            and attn.proj.bias is not None and not has_hooks(blk))


def _affine(norm: torch.nn.LayerNorm) -> bool:
    return norm.weight is not None and norm.bias is not None


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bias or LayerNorm parameter as the kernels read it: fp32, contiguous, outside autograd."""
    return None if t is None else t.detach().float().contiguous()


def mlp_eligible(blk, x: torch.Tensor) -> bool:
    """As :func:`eligible`, for the MLP half (plain fc1/fc2 with the exact GELU, no dropout)."""
    from .mlp import plain_mlp

    return (eligible(blk, x) and plain_mlp(blk.mlp) and type(blk.norm2) is torch.nn.LayerNorm
            and _affine(blk.norm2) and blk.mlp.fc1.bias is not None and blk.mlp.fc2.bias is not None)


def mlp_half(blk, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> x + the MLP half of ``blk``, in one kernel."""
    from . import autocast_dtype, param_as

    dtype = autocast_dtype(x.device.type) or x.dtype
    fc1, fc2, n2 = blk.mlp.fc1, blk.mlp.fc2, blk.norm2
    return _mlp_op(x.contiguous(), _fp32(n2.weight), _fp32(n2.bias), param_as(fc1, "weight", dtype), _fp32(fc1.bias),
                   param_as(fc2, "weight", dtype), _fp32(fc2.bias), float(n2.eps), blk.post_norm)


def attention_half(blk, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> x + the attention half of ``blk`` (a SwinTransformerBlock), in one kernel."""
    from . import autocast_dtype, param_as

    attn = blk.attn
    H, Wd = x.shape[1], x.shape[2]
    window, shift = W.window_and_shift(H, Wd, blk.window_size, blk.shift_size)
    Hp, Wp = W.padded_size(H, Wd, window)
    mask_pad = bool(blk.mask_padding and (Hp != H or Wp != Wd))
    dtype = autocast_dtype(x.device.type) or x.dtype  # the products' dtype, as F.linear would run them
    qkv_b = attn.qkv_bias()
    logit = None
    if attn.version == 2:
        logit = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp().view(-1).float().contiguous()
    n1 = blk.norm1
    return _block_op(x.contiguous(), _fp32(n1.weight), _fp32(n1.bias), param_as(attn.qkv, "weight", dtype),
                     _fp32(qkv_b), _position_bias(attn, window), logit, param_as(attn.proj, "weight", dtype),
                     _fp32(attn.proj.bias),
                     attn.num_heads, window, shift, mask_pad, float(attn.scale), float(n1.eps), blk.post_norm)
