"""Fused shifted-window attention in Triton, forward and backward.

A forward program handles one (window, head), or, in some launch configurations, walks several
windows of one head with the next window's loads in flight; a backward program one head and several windows.
They read q/k/v straight from the qkv projection in token layout (B, Hp, Wp, 3C): the cyclic shift
and the window partition are index arithmetic (token t of window (wy, wx) sits at
((wy*M + t//M + s) % Hp, (wx*M + t%M + s) % Wp)). The relative position bias ((heads, N, N), built from the table by PyTorch so that its gradient flows
through autograd) and the shift mask (computed from region labels in the kernel) are added to the
logits in registers; nothing of shape (B*nW, heads, N, N) is ever written. The output is stored in
token layout at the un-shifted position, so the reverse shift and the crop cost nothing.

The backward recomputes the logits from q/k and the saved log-sum-exp, writes dq/dk/dv in token
layout, and reduces dBias over all windows in registers before one atomic add per program.

Launch configurations (warps; backward programs) are timed on the GPU once per input signature and
the fastest kept (``choices()`` lists them).

Padding (maps not a multiple of the window) is done by PyTorch *before* the qkv projection, exactly
like the reference, so padded tokens carry q/k/v = the qkv bias and gradients reach that bias.
V2 (cosine attention) runs the same kernels with q and k unit-normalised in registers (fp32) and
exp(logit_scale) as a per-head scale; the backward goes back through the normalisation in registers
and sums d(scale) per head in fp32 (one atomic add per program), so nothing is normalised, scaled or
restacked in PyTorch.

Windows of up to 64 tokens (window <= 8) take this path; larger windows fall back to SDPA.

The forward and backward launches are registered as custom operators (``swin::window_attention_fwd``
and ``_bwd``) with their output shapes, so torch.compile captures a model on this backend in one
graph, never tracing into Triton, and fuses the rest around the two calls.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import windows as W

MAX_TOKENS = 64
MASK_VALUE = tl.constexpr(W.MASK_VALUE)  # a constexpr global: kernels may not read plain globals


def supports(x: torch.Tensor, window: int) -> bool:
    return window * window <= MAX_TOKENS and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _token_offsets(pid, nW, nWx, Hp, Wp, H, W, shift, WIN: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    b = pid // nW
    w = pid % nW
    wy = w // nWx
    wx = w % nWx
    t = tl.arange(0, BLOCK)
    valid = t < N
    ys = wy * WIN + t // WIN  # row in the shifted, padded map
    xs = wx * WIN + t % WIN
    yo = (ys + shift) % Hp  # row in the padded (unshifted) map
    xo = (xs + shift) % Wp
    inside = valid & (yo < H) & (xo < W)  # a real token (not padding)
    return b, t, valid, ys, xs, yo, xo, inside


@triton.jit
def _unit_rows(x):
    """x / max(||x||, 1e-12) per row, in fp32, and the clamped norms: F.normalize(x, dim=-1)."""
    xf = x.to(tl.float32)
    n = tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=1)), 1e-12)
    return xf / n[:, None], n


@triton.jit
def _bias_tile(BIAS, h, N: tl.constexpr, BLOCK: tl.constexpr):
    """Head h's (N, N) relative position bias as a (BLOCK, BLOCK) fp32 tile, 0 past N (the backward
    loads it once and keeps it for all the windows a program walks)."""
    t = tl.arange(0, BLOCK)
    both = (t[:, None] < N) & (t[None, :] < N)
    return tl.load(BIAS + h * N * N + t[:, None] * N + t[None, :], mask=both, other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE (fp32 inputs): full fp32 products rather than TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _logits(q, k, bias, valid, ys, xs, inside, Hp, Wp, shift, scale,
            WIN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PAD: tl.constexpr, IEEE: tl.constexpr):
    """(scale * q k^T + bias + shift mask, with -inf past N; and q k^T itself)."""
    c = _dot(q, tl.trans(k), IEEE)
    s = c * scale + bias
    if HAS_MASK:
        # the official region labels of the shifted padded map, 3 x 3 slices per axis
        ry = tl.where(ys < Hp - WIN, 0, tl.where(ys < Hp - shift, 1, 2))
        rx = tl.where(xs < Wp - WIN, 0, tl.where(xs < Wp - shift, 1, 2))
        label = tl.where(shift > 0, ry * 3 + rx, 0)
        if MASK_PAD:
            label = label + tl.where(inside, 0, 100)
        s = s + tl.where(label[:, None] != label[None, :], MASK_VALUE, 0.0)
    s = tl.where(valid[None, :], s, float("-inf"))
    return s, c


@triton.jit
def _fwd_window(pid, h, QKV, BIAS, SCALE, O, LSE, nW, nWx, Hp, Wp, H, W, shift, scale, sqb, sqh, sqw, sob, soh, sow, C,
                HEADS: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, N: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_PAD: tl.constexpr, IEEE: tl.constexpr, COSINE: tl.constexpr,
                STORE_LSE: tl.constexpr):
    """Window ``pid``, head ``h``: softmax(scale q k^T + bias + mask) v, stored in token layout."""
    b, t, valid, ys, xs, yo, xo, inside = _token_offsets(pid, nW, nWx, Hp, Wp, H, W, shift, WIN, N, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    ld = valid[:, None] & dmask[None, :]
    base = QKV + b.to(tl.int64) * sqb + yo.to(tl.int64)[:, None] * sqh + xo[:, None] * sqw + h * D + dd[None, :]
    q = tl.load(base, mask=ld, other=0.0)
    k = tl.load(base + C, mask=ld, other=0.0)
    v = tl.load(base + 2 * C, mask=ld, other=0.0)
    if COSINE:  # V2: cosine attention, exp(logit_scale) per head
        qn, _ = _unit_rows(q)
        kn, _ = _unit_rows(k)
        q, k = qn.to(v.dtype), kn.to(v.dtype)
        scale = tl.load(SCALE + h)
    # the bias tile's pointers made after the product: built before it (stop 6) they stayed live
    # across it (166 registers instead of 120 in stop 9's compile without the launcher's alignment
    # attributes; as launched, 96)
    s, _ = _logits(q, k, _bias_tile(BIAS, h, N, BLOCK), valid, ys, xs, inside, Hp, Wp, shift, scale, WIN,
                   HAS_MASK, MASK_PAD, IEEE)
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    p = p / l[:, None]
    o = _dot(p.to(v.dtype), v, IEEE)
    optr = O + b.to(tl.int64) * sob + yo.to(tl.int64)[:, None] * soh + xo[:, None] * sow + h * D + dd[None, :]
    tl.store(optr, o.to(O.dtype.element_ty), mask=inside[:, None] & dmask[None, :])
    if STORE_LSE:
        tl.store(LSE + (pid * HEADS + h) * BLOCK + t, m + tl.log(l))


@triton.jit
def _fwd_kernel(QKV, BIAS, SCALE, O, LSE, nW, nWx, Hp, Wp, H, W, shift, scale, total,
                sqb, sqh, sqw, sob, soh, sow, C,
                HEADS: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, N: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_PAD: tl.constexpr, IEEE: tl.constexpr, COSINE: tl.constexpr,
                STORE_LSE: tl.constexpr, LOOP: tl.constexpr, STAGES: tl.constexpr):
    # LOOP False: one program per (window, head), straight-line code. LOOP True: a program walks
    # windows pid, pid + programs, ... of one head, and the next window's q/k/v loads are issued
    # (as asynchronous copies) while the current one computes: latency hidden by pipelining rather
    # than by more programs per SM
    h = tl.program_id(1)
    if LOOP:
        for pid in tl.range(tl.program_id(0), total, tl.num_programs(0), num_stages=STAGES):
            _fwd_window(pid, h, QKV, BIAS, SCALE, O, LSE, nW, nWx, Hp, Wp, H, W, shift, scale, sqb, sqh, sqw, sob,
                        soh, sow, C, HEADS, D, WIN, N, BLOCK, BLOCK_D, HAS_MASK, MASK_PAD, IEEE, COSINE, STORE_LSE)
    else:
        _fwd_window(tl.program_id(0), h, QKV, BIAS, SCALE, O, LSE, nW, nWx, Hp, Wp, H, W, shift, scale, sqb, sqh,
                    sqw, sob, soh, sow, C, HEADS, D, WIN, N, BLOCK, BLOCK_D, HAS_MASK, MASK_PAD, IEEE, COSINE,
                    STORE_LSE)


@triton.jit
def _bwd_kernel(QKV, BIAS, SCALE, O, DO, LSE, DQKV, DBIAS, DSCALE, nW, nWx, Hp, Wp, H, W, shift, scale, total,
                sqb, sqh, sqw, sob, soh, sow, C,
                HEADS: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, N: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_PAD: tl.constexpr, IEEE: tl.constexpr, COSINE: tl.constexpr):
    start = tl.program_id(0)
    h = tl.program_id(1)
    nprog = tl.num_programs(0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    t0 = tl.arange(0, BLOCK)
    bias = _bias_tile(BIAS, h, N, BLOCK)
    dbias = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    dscale = tl.zeros([BLOCK], dtype=tl.float32)  # V2: d(loss)/d(scale), summed per query row
    if COSINE:
        scale = tl.load(SCALE + h)
    for pid in range(start, total, nprog):
        b, t, valid, ys, xs, yo, xo, inside = _token_offsets(pid, nW, nWx, Hp, Wp, H, W, shift, WIN, N, BLOCK)
        ld = valid[:, None] & dmask[None, :]
        tok = b.to(tl.int64) * sqb + yo.to(tl.int64)[:, None] * sqh + xo[:, None] * sqw + h * D + dd[None, :]
        q = tl.load(QKV + tok, mask=ld, other=0.0)
        k = tl.load(QKV + tok + C, mask=ld, other=0.0)
        v = tl.load(QKV + tok + 2 * C, mask=ld, other=0.0)
        otok = b.to(tl.int64) * sob + yo.to(tl.int64)[:, None] * soh + xo[:, None] * sow + h * D + dd[None, :]
        lo = inside[:, None] & dmask[None, :]
        o = tl.load(O + otok, mask=lo, other=0.0).to(tl.float32)
        do = tl.load(DO + otok, mask=lo, other=0.0)
        if COSINE:
            qn, nq = _unit_rows(q)
            kn, nk = _unit_rows(k)
            q, k = qn.to(v.dtype), kn.to(v.dtype)
        s, c = _logits(q, k, bias, valid, ys, xs, inside, Hp, Wp, shift, scale, WIN, HAS_MASK, MASK_PAD, IEEE)
        lse = tl.load(LSE + (pid * HEADS + h) * BLOCK + t)
        p = tl.exp(s - lse[:, None])
        p = tl.where(valid[:, None] & valid[None, :], p, 0.0)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)  # rowsum(dO * O) = rowsum(P * dP)
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dbias += ds
        dq = _dot(ds.to(k.dtype), k, IEEE) * scale
        dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale
        if COSINE:
            dscale += tl.sum(ds * c, axis=1)
            # back through F.normalize: (g - u <g, u>) / n, g / n alone where the norm was clamped
            dq = (dq - qn * tl.where(nq > 1e-12, tl.sum(dq * qn, axis=1), 0.0)[:, None]) / nq[:, None]
            dk = (dk - kn * tl.where(nk > 1e-12, tl.sum(dk * kn, axis=1), 0.0)[:, None]) / nk[:, None]
        ty = DQKV.dtype.element_ty
        tl.store(DQKV + tok, dq.to(ty), mask=ld)
        tl.store(DQKV + tok + C, dk.to(ty), mask=ld)
        tl.store(DQKV + tok + 2 * C, dv.to(ty), mask=ld)
    tl.atomic_add(DBIAS + h * N * N + t0[:, None] * N + t0[None, :], dbias,
                  mask=(t0[:, None] < N) & (t0[None, :] < N))
    if COSINE:
        tl.atomic_add(DSCALE + h, tl.sum(dscale, axis=0))


def _meta(qkv: torch.Tensor, heads: int, window: int):
    C = qkv.shape[-1] // 3
    D = C // heads
    N = window * window
    return dict(HEADS=heads, D=D, WIN=window, N=N, BLOCK=max(16, triton.next_power_of_2(N)),
                BLOCK_D=max(16, triton.next_power_of_2(D)), IEEE=qkv.dtype == torch.float32)


def _geometry(qkv: torch.Tensor, heads: int, window: int):
    B, Hp, Wp, C3 = qkv.shape
    nWx = Wp // window
    return B, C3 // 3, (Hp // window) * nWx, nWx


# Launch configurations. The kernels are short and latency-bound (a (64, 32) tile per window and
# head), so the warps per program and how many windows each program walks decide their speed; which
# is best depends on the GPU and the stage. The first of each list is the launch measured on an H200
# in stops 6 and 9; on CUDA each is timed once per input signature and the fastest kept
# (``choices()``). Per thread on sm_90 as the launcher specialises them (``benchmarks/
# triton_resources.py``, bf16, V1 shifted, Swin-T stage 1): the one-window forward 96 registers
# (5 programs per SM), capped at 80 with 8-16 bytes spilled (6); the walking forward (programs
# striding over windows, the next window's q/k/v/bias copied asynchronously while one computes,
# 45 KB of shared memory) 150-168 (3), capped at 128 without spilling (4; V2 spills ~100 bytes);
# the backward (walking, pipelined) 255 (2).
# Dropped after the H200 timed them (stop 12, benchmarks/kernel_bench.py, Swin-T's four stages at
# b256 bf16; never chosen in training b128 either): the forward at 8 warps (1.05-1.9x slower than
# 4 warps at every stage) and the backward capped at 168 or 128 registers, or at 8 warps (their
# spills made them 1.6-4x slower than 264 programs uncapped, the fastest at every stage). Each one
# kept costs a compilation per input signature on the first call.
FWD_CONFIGS = (dict(num_warps=4), dict(num_warps=4, maxnreg=80),
               dict(num_warps=4, programs=528, stages=2, maxnreg=128), dict(num_warps=4, programs=1056, stages=2))
BWD_CONFIGS = (dict(programs=1056, num_warps=4), dict(programs=264, num_warps=4))
_CHOSEN: dict = {}  # (kind, signature) -> index into the configurations
_CONFIGS: dict = {}  # kind -> its configurations (forward, backward, and triton_block's)
FORCE_CONFIG: Optional[int] = None  # tests: run this configuration (index) instead of choosing


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1 while
    cuda:0 is current would otherwise run the kernels on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _compile_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("num_warps", "maxnreg")}


def _programs(config: dict, total: int, heads: int, cuda: bool) -> int:
    """Backward programs per head: ~programs in all over the heads, each walking several windows
    (on an H100/H200's 132 SMs, 1056 is 8 per SM). Off CUDA (the interpreter, in tests) 3, so that
    each walks several windows of the small test maps."""
    return max(1, min(total, config["programs"] // heads)) if cuda else min(total, 3)


def _elapsed_ms(launch, config) -> float:
    launch(config)  # compile and warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        launch(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _pow2(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(n - 1, 0).bit_length()


def _shape_key(shape) -> tuple:
    """A tensor shape as a timing signature: the leading (batch) dimension rounded up to a power of
    two, so that varying batch sizes (a last partial batch, dynamic batching, samples skipped by
    stochastic depth) reuse one timing instead of compiling and timing every launch anew."""
    return (_pow2(shape[0]),) + tuple(shape[1:])


def _choose(kind: str, signature: tuple, configs: tuple, launch, cuda: bool):
    """``launch(config)`` with the configuration that ran fastest for this signature; the timing
    (each configuration once to compile, then three timed launches) happens on the first call."""
    if FORCE_CONFIG is not None:
        return launch(configs[FORCE_CONFIG % len(configs)])
    key = (kind, signature)
    _CONFIGS[kind] = configs
    if key not in _CHOSEN:
        if os.environ.get("SWIN_TRITON_TUNE", "1") == "0":  # the user's choice: first launch, no timing
            return launch(configs[0])
        if not cuda or torch.cuda.is_current_stream_capturing() or len(configs) == 1:
            return launch(configs[0])  # nothing to time (CPU, or inside CUDA-graph capture)
        times = [_elapsed_ms(launch, config) for config in configs]
        _CHOSEN[key] = min(range(len(configs)), key=times.__getitem__)
    return launch(configs[_CHOSEN[key]])


def choices() -> dict:
    """{(kind, signature): chosen configuration} of every signature timed so far in this process."""
    return {k: _CONFIGS[k[0]][i] for k, i in _CHOSEN.items()}


# The forward and the backward are custom operators: torch.compile (dynamo, inductor) treats each as
# one opaque call with a known output shape and fuses everything around it, and never traces into
# the Triton launch. Eager mode pays one dispatch per call.
@torch.library.custom_op("swin::window_attention_fwd", mutates_args=())
def _fwd_op(qkv: torch.Tensor, bias: torch.Tensor, logit: Optional[torch.Tensor], heads: int, height: int,
            width: int, window: int, shift: int, mask_pad: bool, scale: float,
            need_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hp, Wp, 3C) contiguous qkv, (heads, N, N) fp32 bias, and for V2 the (heads,) fp32
    exp(logit_scale) (q and k are then unit-normalised in the kernel) -> (B, height, width, C) output
    and the (B*nW, heads, BLOCK) fp32 log-sum-exp the backward needs (empty unless ``need_lse``:
    one store fewer; on sm_90 V2 shifted takes 120 registers per thread without it, 130 with it)."""
    B, C, nW, nWx = _geometry(qkv, heads, window)
    meta = _meta(qkv, heads, window)
    out = torch.empty(B, height, width, C, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B * nW, heads, meta["BLOCK"]) if need_lse else (0,), device=qkv.device, dtype=torch.float32)

    def launch(config):
        loop = "programs" in config  # programs walking several windows each, loads pipelined
        grid = (_programs(config, B * nW, heads, qkv.is_cuda) if loop else B * nW, heads)
        _fwd_kernel[grid](
            qkv, bias, bias if logit is None else logit, out, lse, nW, nWx, qkv.shape[1], qkv.shape[2], height,
            width, shift, scale, B * nW, qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1),
            out.stride(2), C, HAS_MASK=shift > 0 or mask_pad, MASK_PAD=mask_pad, COSINE=logit is not None,
            STORE_LSE=need_lse, LOOP=loop, STAGES=config.get("stages", 2), **_compile_options(config), **meta)

    with _device_of(qkv):
        _choose("fwd", (_shape_key(qkv.shape), qkv.dtype, heads, window, shift > 0, mask_pad, logit is not None,
                        need_lse), FWD_CONFIGS, launch, qkv.is_cuda)
    return out, lse


@_fwd_op.register_fake
def _(qkv, bias, logit, heads, height, width, window, shift, mask_pad, scale, need_lse):
    B, C, nW, _ = _geometry(qkv, heads, window)
    block = _meta(qkv, heads, window)["BLOCK"]
    return qkv.new_empty(B, height, width, C), qkv.new_empty((B * nW, heads, block) if need_lse else (0,),
                                                              dtype=torch.float32)


@torch.library.custom_op("swin::window_attention_bwd", mutates_args=())
def _bwd_op(qkv: torch.Tensor, bias: torch.Tensor, logit: Optional[torch.Tensor], out: torch.Tensor,
            lse: torch.Tensor, dout: torch.Tensor, heads: int, height: int, width: int, window: int, shift: int,
            mask_pad: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the forward: (dqkv in qkv's layout and dtype, dbias in fp32, d logit (heads,)
    in fp32, zeros for V1)."""
    B, C, nW, nWx = _geometry(qkv, heads, window)
    meta = _meta(qkv, heads, window)
    dout = dout.contiguous()
    total = B * nW

    def launch(config):
        # each program walks many windows, summing dBias (and V2's d scale) in registers, then adds
        # them atomically: fresh zeroed sums on every launch (the timing launches too)
        dqkv = torch.empty_like(qkv)
        dbias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
        dlogit = torch.zeros(heads, device=bias.device, dtype=torch.float32)
        _bwd_kernel[(_programs(config, total, heads, qkv.is_cuda), heads)](
            qkv, bias, bias if logit is None else logit, out, dout, lse, dqkv, dbias, dlogit, nW, nWx, qkv.shape[1],
            qkv.shape[2], height, width, shift, scale, total,
            qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2), C,
            HAS_MASK=shift > 0 or mask_pad, MASK_PAD=mask_pad, COSINE=logit is not None,
            **_compile_options(config), **meta)
        return dqkv, dbias, dlogit

    with _device_of(qkv):
        return _choose("bwd", (_shape_key(qkv.shape), qkv.dtype, heads, window, shift > 0, mask_pad, logit is not None),
                       BWD_CONFIGS, launch, qkv.is_cuda)


@_bwd_op.register_fake
def _(qkv, bias, logit, out, lse, dout, heads, height, width, window, shift, mask_pad, scale):
    return torch.empty_like(qkv), bias.new_empty(bias.shape, dtype=torch.float32), \
        bias.new_empty(heads, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    qkv, bias, logit, *geom, need_lse = inputs
    ctx.save_for_backward(qkv, bias, logit, *output)
    ctx.geom, ctx.need_lse = geom, need_lse
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    if not ctx.need_lse:
        raise RuntimeError("swin::window_attention_fwd ran with need_lse=False, so it has no backward; "
                           "call it with need_lse=True when its inputs need gradients.")
    qkv, bias, logit, out, lse = ctx.saved_tensors
    dqkv, dbias, dlogit = _bwd_op(qkv, bias, logit, out, lse, dout, *ctx.geom)
    return (dqkv, dbias.to(bias.dtype), None if logit is None else dlogit.to(logit.dtype)) + (None,) * (len(ctx.geom) + 1)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_window_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int, height: int, width: int,
                           window: int, shift: int, mask_padding: bool, scale: float,
                           logit: torch.Tensor | None = None) -> torch.Tensor:
    """Shifted-window attention of a (B, Hp, Wp, 3C) qkv map (padded to a window multiple) with a
    (heads, N, N) bias -> (B, height, width, C) attention output, before the output projection.
    With ``logit`` ((heads,), V2): cosine attention, softmax(logit * cos(q, k) + bias)."""
    Hp, Wp = qkv.shape[1], qkv.shape[2]
    mask_pad = bool(mask_padding and (Hp != height or Wp != width))
    # the log-sum-exp is stored only when a backward will read it (training)
    need_lse = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qkv, bias, logit))
    logit = None if logit is None else logit.float().contiguous()
    out, _ = _fwd_op(qkv.contiguous(), bias.float().contiguous(), logit, heads, height, width, window, shift,
                     mask_pad, float(scale), need_lse)
    return out


def _position_bias(attn, window: int) -> torch.Tensor:
    """(heads, N, N) fp32 bias, cached while nothing needs its gradient."""
    from . import cached
    from .sdpa import bias_params

    params = bias_params(attn)
    build = lambda: attn.position_bias(window).float().contiguous()  # noqa: E731
    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
        return build()
    return cached(attn, ("triton", window, params[0].device), params, build)


def window_attention_triton(attn, x: torch.Tensor, window: int, shift: int, mask_padding: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, C); the same function as ``attn``'s reference path."""
    if attn.attn_drop.training and attn.attn_drop.p > 0:  # no dropout inside the kernel
        from .sdpa import window_attention_sdpa

        return window_attention_sdpa(attn, x, window, shift, mask_padding)
    H, Wd, heads = x.shape[1], x.shape[2], attn.num_heads
    xp = W.pad_to_window(x, window)  # zeros, as the reference: padded tokens get qkv = qkv bias
    qkv = attn.project_qkv(xp)  # (B, Hp, Wp, 3C)
    logit = None
    if attn.version == 2:  # q, k normalised in the kernel; exp(logit_scale) its per-head scale
        logit = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp().view(heads)
    out = fused_window_attention(qkv, _position_bias(attn, window), heads, H, Wd, window, shift, mask_padding,
                                 attn.scale, logit)
    return attn.proj_drop(attn.proj(out))
