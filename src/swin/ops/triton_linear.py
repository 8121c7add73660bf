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

Stop 19 (no GPU lent) added a second kernel for Hopper and newer, as stop 13's lesson asked: the same
product, persistent, with every tile moved by the tensor-memory accelerator through descriptors
(``_linear_gelu_tma_kernel``), and four launch configurations for it at the end of ``CONFIGS``. The
per-signature timing chooses between both kernels' configurations. Tested under the interpreter
(values, and every access inside a tensor); not yet timed on a GPU:
``ONLY=k_linear bash benchmarks/gpu_check.sh`` times each configuration against cuBLAS + GELU.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _INTERPRET
from .triton_window import _choose, _device_of, _pow2

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


@triton.jit
def _gelu_tile(acc, out_dtype: tl.constexpr):
    h = acc.to(out_dtype).to(tl.float32)  # rounded as fc1's output is
    return (0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))).to(out_dtype)  # exact (erf) GELU


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
        tl.store(OUT + rm[:, None] * stride_om + rn[None, :], _gelu_tile(acc, OUT.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _linear_gelu_tma_kernel(x_desc, w_desc, out_desc, B, M, N, K,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    """As :func:`_linear_gelu_kernel`, persistent, every tile moved by the Hopper tensor-memory
    accelerator: X's (BLOCK_M, BLOCK_K) and W's (BLOCK_N, BLOCK_K) tiles loaded through descriptors
    (rows and columns past the ends read as zeros), the output stored through one in two halves of
    (BLOCK_M, BLOCK_N / 2) (past the ends: not written), so the epilogue holds half a tile of GELU at a
    time. The tile loop is flattened into the k loop: the next tile's loads overlap this one's epilogue."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    dtype = out_desc.dtype
    HALF: tl.constexpr = BLOCK_N // 2
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
        first_m = (tile // per_group) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        m0 = (first_m + (tile % per_group) % rows_in_group) * BLOCK_M
        n0 = ((tile % per_group) // rows_in_group) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            acc = tl.dot(x_desc.load([m0, k]), w_desc.load([n0, k]).T, acc)
        if HAS_BIAS:
            rn = n0 + tl.arange(0, BLOCK_N)
            acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        out_desc.store([m0, n0], _gelu_tile(left, dtype))
        out_desc.store([m0, n0 + HALF], _gelu_tile(right, dtype))


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
           dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, per_sm=2),
           # TMA (stop 19, not yet timed on a GPU): persistent, one or two programs per SM
           dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, per_sm=1, tma=True),
           dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, per_sm=1, tma=True),
           dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4, per_sm=1, tma=True),
           dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, per_sm=2, tma=True))


_TMA_FAILED: list = []  # the exception, once the TMA kernel failed to build in this process


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these 2-D tensors: a Hopper or newer GPU (or the interpreter),
    descriptors in this Triton, 16-byte aligned bases and row strides (what a TMA descriptor needs)."""
    if TensorDescriptor is None or not (tensors[0].is_cuda or _INTERPRET):
        return False
    if tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


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
    tma = M > 0 and _tma_ok(x2, weight, out)  # else a TMA configuration runs the pointer kernel, same tiles

    def launch(config):
        bk = config["block_k"]
        while K % bk:
            bk //= 2
        tiles = triton.cdiv(M, config["block_m"]) * triton.cdiv(N, config["block_n"])
        persistent = "per_sm" in config
        programs = min(tiles, config["per_sm"] * _sm_count(x.device) if persistent else tiles)
        if config.get("tma") and tma and not _TMA_FAILED:
            bm, bn = config["block_m"], config["block_n"]
            try:
                _linear_gelu_tma_kernel[(programs,)](
                    TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
                    TensorDescriptor.from_tensor(out, [bm, bn // 2]), weight if bias is None else bias, M, N, K,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, HAS_BIAS=bias is not None,
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
                return
            except Exception as exc:  # a Triton that cannot build it (compile errors raise before any launch)
                _TMA_FAILED.append(exc)
                warnings.warn(f"swin: the TMA fc1 + GELU kernel did not build here ({type(exc).__name__}: {exc}); "
                              "its launch configurations run the pointer kernel instead.", stacklevel=2)
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
