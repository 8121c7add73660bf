"""Where the time goes: a torch.profiler table of one implementation's inference or training step.

    PYTHONPATH=src python3 benchmarks/gpu_profile.py --device cuda --impls ours,timm+compile --out $OUT/profile

For each implementation and mode, after warm-up, profiles a few steps and writes
``<out>/<impl>_<mode>.txt``: the top operations/kernels by self device time (self CPU time on a
CPU), and the same time summed into a few groups (matrix products, attention, normalisation,
elementwise, copies/gathers, optimizer, other), so that the next fusion is chosen by the profile. Runs on a CPU
too (small batches), which is how it is tested.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swin.bench import MODELS, _prepare  # noqa: E402
from swin.train import atomic_write_text  # noqa: E402

GROUPS = [  # first match wins; kernel names (CUDA) and aten op names (CPU)
    # inductor names a fused kernel after every op it read, custom ops included: a LayerNorm kernel
    # reading swin::linear_gelu's output is "triton_per_fused_..._linear_gelu_native_layer_norm_..."
    ("norm", r"^triton_\w*native_layer_norm"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|sm90|cublas|linear|xmma|nvjet|wgmma"),
    ("attention", r"attention|flash|fmha|sdpa|softmax|_fwd_kernel|_bwd_kernel|window"),
    ("norm", r"layer_norm|layernorm|norm"),
    ("copy/gather", r"copy|index|gather|scatter|cat|roll|permute|contiguous|clone|fill"),
    ("optimizer", r"adam|optimizer"),
    ("elementwise", r"elementwise|vectorized|gelu|add|mul|div|triton_|fused|reduce|sum|adam"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def self_time_us(e, cuda: bool) -> float:
    if cuda:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return e.self_cpu_time_total


def timed_rows(events, cuda: bool) -> list:
    """The profiler rows whose self times add up to the step: on CUDA the kernels alone. A CPU-side
    row (aten::addmm, a custom op, inductor's launch of a Triton kernel) reports the device time of
    the kernels it launched as its own self device time, so keeping it counted each kernel twice
    (stop 9's H200 profile: 32 ms of kernels for a 16 ms step)."""
    rows = [e for e in events if e.key]
    if cuda:
        rows = [e for e in rows if e.device_type != torch.autograd.DeviceType.CPU and self_time_us(e, True) > 0]
    return rows


def profile_one(impl: str, mode: str, args) -> str:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batch = args.batch_train if mode == "train" else args.batch_infer
    size = args.size
    inputs = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    step, _ = _prepare(impl, args.model, mode, device, dtype, batch, 0.1 if mode == "train" else 0.0, inputs)
    for i in range(args.warmup):
        step(i)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    events = timed_rows(prof.key_averages(), cuda)
    self_time = lambda e: self_time_us(e, cuda)  # noqa: E731
    total = sum(self_time(e) for e in events) or 1.0
    groups: dict[str, float] = {}
    for e in events:
        g = group_of(e.key)
        groups[g] = groups.get(g, 0.0) + self_time(e)
    lines = [f"# {impl}, {mode}, {args.model} {size}, batch {batch}, {args.dtype}, {args.steps} steps on "
             f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}",
             f"total self {'device' if cuda else 'CPU'} time per step: {total / args.steps / 1e3:.2f} ms", "",
             "| group | share |", "|---|---|"]
    lines += [f"| {g} | {t / total:.1%} |" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel / op | group | ms per step | share | calls per step |", "|---|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -self_time(e))[:args.top]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| `{name}` | {group_of(e.key)} | {self_time(e) / args.steps / 1e3:.3f} | "
                     f"{self_time(e) / total:.1%} | {e.count / args.steps:g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--model", default="swin_t", choices=sorted(MODELS))
    p.add_argument("--size", type=int, default=None, help="default: the model's own (224 or 256)")
    p.add_argument("--impls", default="ours", help="comma-separated, as in benchmarks/bench.py")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--batch-infer", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--batch-train", type=int, default=None, help="default 128 on CUDA, 8 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="profile")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.size = args.size or MODELS[args.model]["size"]
    args.batch_infer = args.batch_infer or (256 if cuda else 8)
    args.batch_train = args.batch_train or (128 if cuda else 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for impl in args.impls.split(","):
        for mode in args.modes.split(","):
            try:
                text = profile_one(impl, mode, args)
            except Exception as exc:  # one failure must not cost the other profiles
                text = f"# {impl}, {mode}: failed: {type(exc).__name__}: {exc}\n"
                status = 1
            atomic_write_text(out / f"{impl}_{mode}.txt", text)
            print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
