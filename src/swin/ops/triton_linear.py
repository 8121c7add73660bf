"""fc1 with GELU in its epilogue: ``GELU(x @ W^T + b)`` as one Triton matrix product (inference, CUDA).

Compiled Swin-T inference on an H200 (stop 13 profile, bf16, batch 256) spent 18% of its kernel time
in inductor's GELU passes alone: cuBLAS writes fc1's (tokens, 4C) output, GELU reads it and writes
it again. At stage 1 that is 0.6 GB each way per block, for an elementwise function. Here the GELU is
applied to the product's tile while it is still in registers, so the hidden layer is written once.

The values are the plain module's: the product accumulates in fp32, adds the bias, is rounded to the
output dtype (as fc1's output is), then the exact (erf) GELU is taken in fp32 and rounded again (as
``F.gelu`` on a 16-bit tensor does). Only for 16-bit products (bf16/fp16: autocast or a 16-bit model);
fp32 keeps cuBLAS. ``linear_gelu_reference`` is the plain function it is tested against.

Launch configurations (tile sizes, warps, pipeline stages) are timed once per input signature on the
GPU, like the attention kernels' (``triton_window._choose``).

Measured (H200, stop 13, Swin-T b256, the bf16 model compiled): the GELU passes went, but the twelve
products took 4.0 ms where cuBLAS's fc1 plus the GELU passes took ~3.8: the step's kernel time went
11.43 -> 11.66 ms. At 0.9 TB/s and ~180 TFLOP/s this kernel is far from either bound (its loads are
plain pointer loads, not the Hopper tensor-memory-accelerator copies cuBLAS uses), so it is used by
backend "fused" only (opt-in), not by "auto".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_window import _choose, _device_of, _pow2


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


@triton.jit
def _linear_gelu_kernel(X, Wt, B, OUT, M, N, K, stride_xm, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, PERSISTENT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tiles of GELU(X W^T + B); X (M, K) rows at stride_xm, W (N, K) contiguous,
    K a multiple of BLOCK_K. Tiles are ordered GROUP_M row tiles at a time, so that the weight
    columns and those rows stay in L2 while their tiles run. One tile per program, or (PERSISTENT)
    a few programs per SM walking the tiles, the tile loop flattened into the k loop so that the
    next tile's loads are in flight during this tile's GELU and stores."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=PERSISTENT):
        first_m = (tile // per_group) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows_in_group
        pid_n = (tile % per_group) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm < M
        col_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(X + rm[:, None] * stride_xm + (k + rk)[None, :], mask=row_ok[:, None], other=0.0)
            # (BLOCK_K, BLOCK_N): W^T's tile, read from W's rows
            w = tl.load(Wt + rn[None, :] * K + (k + rk)[:, None], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = acc.to(OUT.dtype.element_ty).to(tl.float32)  # rounded as fc1's output is
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # exact (erf) GELU
        tl.store(OUT + rm[:, None] * stride_om + rn[None, :], y.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_K shrinks to divide K. Swin's fc1 shapes at batch
# 256: (802816 x 96 -> 384), (200704 x 192 -> 768), (50176 x 384 -> 1536), (12544 x 768 -> 3072): the
# first two write-bound, the last two product-bound. sm_90 (ptxas, Triton 3.8): 164-169 registers, no
# spills, except the 128 x 256 tile (255, 120 bytes spilled in the GELU epilogue); persistent 171-191.
# One tile per program: at 155-255 registers x 256 threads one program fits an SM, and nothing overlaps
# its epilogue (stop 13: the twelve products 4.0 ms against cuBLAS + GELU's 3.8). "per_sm": that many
# programs per SM walk the tiles (persistent), the next tile's loads overlapping this one's epilogue.
CONFIGS = (dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
           dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
           dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=4),
           dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
           dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, per_sm=1),
           dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, per_sm=2))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; off CUDA (the interpreter, in tests) 1, so that
    a persistent launch's few programs each walk several tiles."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@torch.library.custom_op("swin::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., K) x, (N, K) weight, (N,) bias (any float dtype; read as fp32) -> GELU(x W^T + b), (..., N)
    in x's dtype. x and weight 16-bit, of one dtype, K and N multiples of 16 (what
    ``ops.mlp.gelu_epilogue_eligible`` admits)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)

    def launch(config):
        bk = config["block_k"]
        while K % bk:
            bk //= 2
        tiles = triton.cdiv(M, config["block_m"]) * triton.cdiv(N, config["block_n"])
        persistent = "per_sm" in config
        programs = min(tiles, config["per_sm"] * _sm_count(x.device) if persistent else tiles)
        _linear_gelu_kernel[(programs,)](x2, weight, weight if bias is None else bias, out, M, N, K, x2.stride(0),
                                         out.stride(0), BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
                                         BLOCK_K=bk, GROUP_M=8, HAS_BIAS=bias is not None, PERSISTENT=persistent,
                                         num_warps=config["num_warps"], num_stages=config["num_stages"])

    if M:
        with _device_of(x):
            _choose("linear_gelu", (_pow2(M), N, K, x.dtype), CONFIGS, launch, x.is_cuda)
    return out.view(*x.shape[:-1], N)


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
