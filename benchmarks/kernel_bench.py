"""The Triton window-attention kernels alone, every launch configuration, at Swin-T's stage shapes:

    PYTHONPATH=src python3 benchmarks/kernel_bench.py            # CUDA, bf16, batch 256 (inference)
    PYTHONPATH=src python3 benchmarks/kernel_bench.py --batch 128 --out $OUT/kernels.md

For each stage (shifted block), forward and backward: microseconds per call for each configuration
in ``swin.ops.triton_window.FWD_CONFIGS`` / ``BWD_CONFIGS`` and the bytes each must move (q/k/v read
and the output written; the backward also reads the output and its gradient and writes dq/dk/dv),
as GB/s against the card's bandwidth: how far a kernel is from the memory bound. Runs on the CPU
under ``TRITON_INTERPRET=1`` at tiny sizes (how it is tested); CPU timings mean nothing. Where C <= 128
(stage 1), also backend "fused"'s attention and MLP halves, each one kernel, against the same work as
separate calls; their GB/s count x read and the output written. In 16-bit, also fc1 with GELU in a
Triton product's epilogue (backend "fused", wider blocks) against cuBLAS + GELU and cuBLAS alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Swin-T at 224: (map side, channels, heads) per stage; window 7
STAGES = [(56, 96, 3), (28, 192, 6), (14, 384, 12), (7, 768, 24)]


def run(batch: int, dtype: torch.dtype, device: str, iters: int, stages=STAGES, window: int = 7) -> list[dict]:
    from swin.bench import _Timer
    from swin.ops import triton_window as T

    timer = _Timer(device)
    rows = []
    for side, C, heads in stages:
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(batch, side, side, 3 * C, device=device, dtype=dtype, generator=g)
        N = window * window
        bias = torch.randn(heads, N, N, device=device, generator=g)
        shift = window // 2 if side > window else 0
        elem = qkv.element_size()
        out, lse = T._fwd_op(qkv, bias, None, heads, side, side, window, shift, False, (C // heads) ** -0.5, True)
        dout = torch.randn_like(out)
        fwd_bytes = batch * side * side * 4 * C * elem  # q, k, v read; output written
        bwd_bytes = batch * side * side * 8 * C * elem  # q, k, v, out, dout read; dq, dk, dv written
        for kind, configs, nbytes in (("fwd", T.FWD_CONFIGS, fwd_bytes), ("bwd", T.BWD_CONFIGS, bwd_bytes)):
            for i, config in enumerate(configs):
                T.FORCE_CONFIG = i
                if kind == "fwd":
                    # inference: no log-sum-exp stored (training's forward stores it, ~2% more bytes)
                    fn = lambda: T._fwd_op(qkv, bias, None, heads, side, side, window, shift, False, 1.0,  # noqa: E731
                                           False)
                else:
                    fn = lambda: T._bwd_op(qkv, bias, None, out, lse, dout, heads, side, side, window,  # noqa: E731
                                           shift, False, 1.0)
                fn()  # compile, warm up
                us = timer(lambda i: fn(), iters) * 1e6
                rows.append(dict(stage=f"{side}x{side}x{C}, {heads} heads", kind=kind, config=config, us=us,
                                 gbps=nbytes / us / 1e3))
        T.FORCE_CONFIG = None
        if C <= 128:  # backend "fused": the attention half as one kernel vs the same work as separate calls
            rows += _block_rows(timer, batch, side, C, heads, window, shift, dtype, device, iters)
        if dtype != torch.float32:  # fc1 + GELU as one Triton product (16-bit only) vs cuBLAS + GELU
            rows += linear_rows(timer, batch * side * side, C, dtype, device, iters, f"{side}x{side}x{C}")
    return rows


def linear_rows(timer, M: int, C: int, dtype, device, iters, stage: str = "") -> list[dict]:
    """fc1 with GELU in the product's epilogue (swin.ops.triton_linear), each launch configuration,
    against cuBLAS's fc1 followed by GELU, cuBLASLt's fc1 with GELU's tanh form in its epilogue
    (swin.ops.mlp.addmm_gelu) and cuBLAS's fc1 alone (the floor a fused product
    should reach): (M, C) -> (M, 4C). GB/s count x read and the hidden layer written once; TFLOP/s
    the product's 2 M C 4C."""
    import torch.nn.functional as F

    from swin.ops import triton_linear as TL
    from swin.ops import triton_window as T

    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(M, C, device=device, dtype=dtype, generator=g)
    w = (torch.randn(4 * C, C, device=device, generator=g) * C ** -0.5).to(dtype)
    b = torch.randn(4 * C, device=device, generator=g).to(dtype)
    nbytes = (M * C + M * 4 * C) * x.element_size()
    flop = 2 * M * C * 4 * C
    forced = T.FORCE_CONFIG
    cases = [("fc1+GELU: one product", i, lambda: TL.linear_gelu(x, w, b)) for i in range(len(TL.CONFIGS))]
    cases += [("fc1+GELU: cuBLAS, then GELU", None, lambda: F.gelu(F.linear(x, w, b))),
              ("fc1+GELU (tanh): cuBLASLt epilogue", None, lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)),
              ("fc1 alone: cuBLAS", None, lambda: F.linear(x, w, b))]
    rows = []
    for name, index, fn in cases:
        T.FORCE_CONFIG = index
        config = "" if index is None else TL.CONFIGS[index]
        failed = len(TL._TMA_FAILED)
        fn()  # compile, warm up
        us = timer(lambda i: fn(), iters) * 1e6
        if len(TL._TMA_FAILED) > failed:  # the TMA kernel did not build: this row timed the pointer kernel
            config = f"{config} (TMA failed, pointer kernel timed: {TL._TMA_FAILED[-1]!r:.120})"
        rows.append(dict(stage=stage or f"{M}x{C}", kind=name, config=config,
                         us=us, gbps=nbytes / us / 1e3, tflops=flop / us / 1e6))
    T.FORCE_CONFIG = forced
    return rows


def _block_rows(timer, batch, side, C, heads, window, shift, dtype, device, iters) -> list[dict]:
    """x + proj(attention(LN(x))) and x + fc2(GELU(fc1(LN(x)))) at one stage: backend "fused"'s
    one-kernel halves (first launch configuration: in a model the timing picks per signature)
    against the same work as separate calls (LayerNorm, products, attention, GELU, residual add)."""
    import torch.nn.functional as F

    from swin.ops import triton_block as TB
    from swin.ops import triton_window as T

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, side, side, C, device=device, dtype=dtype, generator=g)
    ln_w, ln_b = torch.ones(C, device=device), torch.zeros(C, device=device)
    qkv_w = (torch.randn(3 * C, C, device=device, generator=g) * C ** -0.5).to(dtype)
    qkv_b = torch.zeros(3 * C, device=device)
    proj_w = (torch.randn(C, C, device=device, generator=g) * C ** -0.5).to(dtype)
    proj_b = torch.zeros(C, device=device)
    N = window * window
    bias = torch.randn(heads, N, N, device=device, generator=g)
    scale = (C // heads) ** -0.5
    TB_CONFIG = T.FORCE_CONFIG
    T.FORCE_CONFIG = 0

    def fused():
        return TB._block_op(x, ln_w, ln_b, qkv_w, qkv_b, bias, None, proj_w, proj_b, heads, window, shift, False,
                            scale, 1e-5, False)

    def separate():
        h = F.layer_norm(x, (C,), ln_w.to(dtype), ln_b.to(dtype))
        qkv = F.linear(h, qkv_w, qkv_b.to(dtype))
        a, _ = T._fwd_op(qkv, bias, None, heads, side, side, window, shift, False, scale, False)
        return x + F.linear(a, proj_w, proj_b.to(dtype))

    w1 = (torch.randn(4 * C, C, device=device, generator=g) * C ** -0.5).to(dtype)
    w2 = (torch.randn(C, 4 * C, device=device, generator=g) * (4 * C) ** -0.5).to(dtype)
    b1, b2 = torch.zeros(4 * C, device=device), torch.zeros(C, device=device)

    def mlp_fused():
        return TB._mlp_op(x, ln_w, ln_b, w1, b1, w2, b2, 1e-5, False)

    def mlp_separate():
        h = F.layer_norm(x, (C,), ln_w.to(dtype), ln_b.to(dtype))
        return x + F.linear(F.gelu(F.linear(h, w1, b1.to(dtype))), w2, b2.to(dtype))

    rows = []
    nbytes = 2 * batch * side * side * C * x.element_size()  # the fused kernel's x read and output written
    for name, fn in (("attention half: one kernel", fused), ("attention half: separate calls", separate),
                     ("MLP half: one kernel", mlp_fused), ("MLP half: separate calls", mlp_separate)):
        fn()
        us = timer(lambda i: fn(), iters) * 1e6
        rows.append(dict(stage=f"{side}x{side}x{C}, {heads} heads", kind=name, config="", us=us, gbps=nbytes / us / 1e3))
    T.FORCE_CONFIG = TB_CONFIG
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--linear-only", action="store_true", help="only the fc1 + GELU products, each stage")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.linear_only:
        from swin.bench import _Timer

        device = "cuda" if cuda else "cpu"
        rows = [r for side, C, _ in STAGES
                for r in linear_rows(_Timer(device), args.batch * side * side, C, dtype, device, args.iters,
                                     f"{side}x{side}x{C}")]
    else:
        rows = run(args.batch, dtype, "cuda" if cuda else "cpu", args.iters)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: timings mean nothing)"
    lines = [f"{name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, window 7", "",
             "| stage | kernel | configuration | us per call | GB/s moved | TFLOP/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['kind']} | {r['config']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{r['tflops']:.0f} |" if "tflops" in r else
              f"| {r['stage']} | {r['kind']} | {r['config']} | {r['us']:.1f} | {r['gbps']:.0f} | |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from swin.train import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
