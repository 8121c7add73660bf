"""Run by tests/test_ops.py with TRITON_INTERPRET=1: the Triton kernels on the CPU vs the reference.

Prints one JSON line: {"cases": n, "max_rel_err": e, "results": [...], "compiled": {...}}. Small
sizes only (the interpreter runs each program in numpy). "compiled": a whole V1 model with
the default backend ("auto") and a V2 model with backend="triton" under torch.compile(fullgraph=True) (the kernels are custom operators, so dynamo
captures one graph without tracing into Triton), forward and backward, against the reference.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import triton_bounds  # noqa: E402
from test_ops import check_fused_block, check_linear_gelu, check_parity, make_attn, rel_err  # noqa: E402
from swin import windows as W  # noqa: E402
import copy  # noqa: E402

CASES = [  # version, H, W, window, shift, mask_padding
    (1, 8, 8, 4, 0, False), (1, 8, 8, 4, 2, False), (1, 12, 8, 4, 2, False), (1, 10, 7, 4, 2, False),
    (1, 10, 7, 4, 2, True), (1, 5, 6, 3, 1, True), (1, 4, 9, 7, 3, False), (2, 8, 8, 4, 2, False),
    (2, 10, 7, 4, 2, True), (2, 6, 6, 3, 0, False),
]


def main() -> int:
    from swin.ops import resolve_backend

    from swin.ops import triton_window as T

    assert resolve_backend("triton", torch.zeros(1, 8, 8, 16), 4) == "triton", "interpreter not active"
    triton_bounds.install()  # every launch below: each masked-in load/store inside a tensor argument
    bounds_self_test = triton_bounds.self_test()
    worst, results = 0.0, []
    # every case with the first launch configuration, then with the first forward whose programs walk
    # several windows with pipelined loads (a different code path; the backward's programs always do)
    walking = next(i for i, c in enumerate(T.FWD_CONFIGS) if "programs" in c)
    for force, (version, H, Wd, window, shift, mask_padding) in [(f, c) for f in (None, walking) for c in CASES]:
        T.FORCE_CONFIG = force
        attn = make_attn(version, dim=32 if version == 1 else 48, heads=2 if version == 1 else 3, window=window,
                         seed=H * 7 + Wd + shift)
        torch.manual_seed(H * 13 + Wd)
        x = torch.randn(2, H, Wd, attn.dim)
        win, sh = W.window_and_shift(H, Wd, window, shift)
        outs = {}
        g = None
        for name in ("reference", "triton"):
            a = copy.deepcopy(attn)
            a.backend = name
            xi = x.clone().requires_grad_(True)
            out = a(xi, win, sh, mask_padding)
            g = torch.randn_like(out) if g is None else g
            out.backward(g)
            outs[name] = [out, xi.grad] + [p.grad for p in a.parameters()]
        with torch.no_grad():  # inference: the forward stores no log-sum-exp
            a = copy.deepcopy(attn)
            a.backend = "triton"
            outs["triton"].append(a(x, win, sh, mask_padding))
            outs["reference"].append(outs["reference"][0])
        errs = [rel_err(f, r) for f, r in zip(outs["triton"], outs["reference"])]
        results.append({"case": [version, H, Wd, window, shift, mask_padding], "config": force,
                        "errs": [round(e, 9) for e in errs]})
        worst = max(worst, *errs)
    T.FORCE_CONFIG = None
    for version, case, mask_padding in FP16_CASES:  # the GPU tests' bf16 check, in fp16: raises if off
        check_parity("triton", version, case, mask_padding, "cpu", torch.float16, 1e-2)
    # backend "fused": each half of a block as one kernel (inference), fp32 and fp16
    fused = [check_fused_block(version, case, mask_padding, "cpu", dtype, tol)
             for version, case, mask_padding in FUSED_CASES
             for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2))]
    worst = max(worst, *fused[0::2])
    # fp32 weights under fp16 autocast: the halves take fp16 copies of the weights made once (ops.param_as)
    fused_autocast = [check_fused_block(version, case, mask_padding, "cpu", torch.float16, 1e-2, autocast=True)
                      for version, case, mask_padding in (FUSED_CASES[1], FUSED_CASES[3])]  # V1 and V2, padded
    # fc1 with GELU in its epilogue (16-bit inference): the product alone, every configuration; a model
    from swin.ops.triton_linear import CONFIGS as LINEAR_CONFIGS

    from swin.ops import triton_linear

    tma_run, tma_launches = triton_linear._linear_gelu_tma_kernel.run, []
    triton_linear._linear_gelu_tma_kernel.run = lambda *a, **k: tma_launches.append(1) or tma_run(*a, **k)
    try:  # the TMA configurations must run the TMA kernel (a build failure would fall back silently)
        linear_gelu = check_linear_gelu("cpu", torch.float16, [(70, 48, 96, True), (33, 96, 384, False)],
                                        range(len(LINEAR_CONFIGS)))
    finally:
        triton_linear._linear_gelu_tma_kernel.run = tma_run
    linear_tma = {"launches": len(tma_launches), "failed": [repr(e) for e in triton_linear._TMA_FAILED]}
    gelu_model = gelu_epilogue_model()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    stage1 = fused_stage1_autocast()
    import kernel_bench  # the GPU kernel benchmark, every configuration, at a tiny size

    bench_rows = kernel_bench.run(1, torch.float32, "cpu", 1, stages=[(8, 16, 2)], window=4)
    from swin.bench import _Timer

    linear_bench_rows = kernel_bench.linear_rows(_Timer("cpu"), 40, 32, torch.float16, "cpu", 1)
    compiled = {name: compiled_model_errors(name, backend) for name, backend in (("swin_micro", "auto"), ("swinv2_micro", "triton"))}
    worst = max(worst, *(e for errs in compiled.values() for e in errs))
    print(json.dumps({"cases": len(results), "max_rel_err": worst, "results": results, "compiled": compiled,
                      "fused_block_errs": fused, "fused_autocast_errs": fused_autocast,
                      "fused_compiled": compiled_fused_logits_error(),
                      "fused_eligible": fused_eligibility(),
                      "fp16_cases": len(FP16_CASES), "kernel_bench_rows": len(bench_rows),
                      "linear_bench_rows": len(linear_bench_rows),
                      "fused_stage1": stage1, "linear_gelu_errs": linear_gelu, "linear_tma": linear_tma, "gelu_epilogue_model": gelu_model, "bounds_self_test": bounds_self_test,
                      "bounds": dict(triton_bounds.STATS)}))
    return 0


# fp16 runs the kernels' low-precision branch (tensor-core dots, casts) on the CPU; the interpreter
# mis-reads bf16 (numpy has no bf16), fp16 it reads right. (version, (H, W, window, shift), mask_padding)
FP16_CASES = [(1, (10, 7, 4, 2), True), (2, (8, 8, 4, 2), False), (2, (10, 7, 4, 2), True)]
FUSED_CASES = [(1, (8, 8, 4, 2), False), (1, (10, 7, 4, 2), True), (1, (4, 9, 7, 3), False), (2, (10, 7, 4, 2), True),
               (2, (6, 6, 3, 0), False)]


def fused_stage1_autocast() -> list[float]:
    """Backend "fused"'s two kernels at the shape that stopped an H200 with an illegal memory access
    (stop 12: Swin-T stage 1, 56 x 56 x 96, 3 heads, unshifted and shifted, fp32 input and weights
    under 16-bit autocast), each launch configuration, under the bounds check: the GPU probe's cases
    (benchmarks/fused_probe.py) at batch 1. Returns each case's error against the reference path."""
    import fused_probe
    from swin.ops import triton_window as T

    errs = [fused_probe.run_case(case, device="cpu", batch=1) for case in fused_probe.cases("fp32", 56)]
    T.FORCE_CONFIG = None
    return errs


def gelu_epilogue_model() -> dict:
    """A whole model (backend "triton", fp32 weights; "auto" would take the CPU's tiled path here) under
    fp16 autocast without grad, eager and inside
    torch.compile(fullgraph=True): each MLP's fc1 + GELU runs as one product (counted), logits
    against the reference path's under the same autocast. With grad on it must not run."""
    import swin
    from swin.ops import triton_linear
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend="fused", drop_path_rate=0.0).eval()
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(2, 3, 36, 28)
    calls = []
    real = triton_linear.linear_gelu
    triton_linear.linear_gelu = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)  # grad on: the training MLP, no epilogue product
            grad_calls = len(calls)
            with torch.no_grad():
                out, r = model(x), ref(x)
    finally:
        triton_linear.linear_gelu = real
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        compiled = torch.compile(model, backend=counter, fullgraph=True)(x)
    from swin.ops.triton_block import MAX_CHANNELS

    blocks = sum(len(stage.blocks) for stage in model.layers if stage.blocks[0].attn.dim > MAX_CHANNELS)
    return {"calls": len(calls) - grad_calls, "blocks": blocks, "grad_calls": grad_calls,
            "err": rel_err(out.float(), r.float()), "compiled_err": rel_err(compiled.float(), r.float()),
            "in_graph": counter.frame_count == 1 and "linear_gelu" in counter.graphs[0].code}


def fused_eligibility() -> dict:
    """When backend "fused" takes its kernels (True) and when the block runs its usual path."""
    from swin.config import SwinConfig
    from swin.model import SwinTransformerBlock
    from swin.ops import fused_block_eligible

    def block(dim=32, heads=2):
        cfg = SwinConfig(version=1, embed_dim=dim, depths=(2,), num_heads=(heads,), window_size=4, img_size=(32, 32),
                         drop_path_rate=0.0, backend="fused")
        return SwinTransformerBlock(cfg, dim, heads, 2, 0, 0.0).eval()

    x = torch.randn(1, 8, 8, 32)
    out = {}
    with torch.no_grad():
        out["eval_no_grad"] = fused_block_eligible(block(), x)
        out["train_mode"] = fused_block_eligible(block().train(), x)
        out["c192"] = fused_block_eligible(block(192, 6), torch.randn(1, 8, 8, 192))
        hooked = block()
        hooked.mlp.register_forward_hook(lambda m, i, o: None)
        out["hooked"] = fused_block_eligible(hooked, x)
        sub = block()
        sub.attn.proj = type("MyLinear", (torch.nn.Linear,), {})(32, 32)  # e.g. a LoRA wrapper
        out["replaced_proj"] = fused_block_eligible(sub, x)
    out["grad_enabled"] = fused_block_eligible(block(), x)  # parameters need grad
    return out


def compiled_fused_logits_error() -> float:
    """A whole model on backend "fused" under torch.compile(fullgraph=True), inference, against the
    reference's logits; asserts that the graph calls the one-kernel attention half."""
    import swin
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend="fused", drop_path_rate=0.0).eval()
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(2, 3, 36, 28)  # padded, non-square maps
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        out = torch.compile(model, backend=counter, fullgraph=True)(x)
        code = counter.graphs[0].code
        assert counter.frame_count == 1 and "attention_half" in code and "mlp_half" in code, "fused block not in graph"
        return rel_err(out, ref(x))


def compiled_model_errors(name: str, backend: str) -> list[float]:
    """[logits, max over parameter grads] relative errors of the compiled model; asserts that the
    graph calls the Triton kernels (backend "auto" takes them inside torch.compile too)."""
    import swin
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = swin.create_model(name, backend=backend, drop_path_rate=0.0)
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(2, 3, 36, 28)  # padded, non-square maps
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(model, backend=counter, fullgraph=True)(x)  # fullgraph: a graph break fails
    assert counter.frame_count == 1 and "window_attention_fwd" in counter.graphs[0].code, "kernels not in graph"
    out.square().mean().backward()
    r = ref(x)
    r.square().mean().backward()
    grads = [rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
    return [rel_err(out, r), max(grads)]


if __name__ == "__main__":
    sys.exit(main())
