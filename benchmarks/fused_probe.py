"""Which launch of backend "fused" stops a GPU with "an illegal memory access", and why.

    PYTHONPATH=src python3 benchmarks/fused_probe.py --out DIR     # one CUDA GPU; < 4 minutes

Stop 12 (H200, Triton 3.6): a Swin-T at 224 x 224 under bf16 autocast (fp32 input, weights cast to
bf16 once) stopped in a Triton kernel at batch 2 and 256; fp32 at 224 x 224, a bf16 model's two
kernels at 56 x 56 (benchmarks/kernel_bench.py) and the same autocast at 224 x 248 ran right. The
interpreter's bounds check (tests/triton_bounds.py) finds no access outside a tensor at that shape.
Since a crash ends the CUDA context, each group of cases runs in its own process (with
CUDA_LAUNCH_BLOCKING=1): it prints a line before each launch and one after it, so the last "start"
line of a process that died names the launch; the next process resumes after it. Cases: each half
(attention, MLP) x input dtype (fp32 under bf16 autocast, bf16 model) x map (56 x 56, 56 x 62) x
unshifted/shifted x each launch configuration, on Swin-T stage 1's block (C = 96, 3 heads), batch 2;
then the whole model as it crashed. Where compute-sanitizer runs, the first case that crashed is
run again under its memcheck, which names the faulting access. Results: DIR/fused_probe.md/.json,
written after each group (a kill keeps what ran); no new process starts past --budget-s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# "cpu": a dry run of this script under TRITON_INTERPRET=1 (fp16 in place of bf16, which the interpreter mis-reads)
DEVICE = os.environ.get("FUSED_PROBE_DEVICE", "cuda")
GROUPS = [(xdtype, width) for xdtype in ("fp32", "bf16") for width in (56, 62)]


def cases(xdtype: str, width: int, configs: int | None = None) -> list[dict]:
    from swin.ops import triton_block as TB

    out = []
    for kernel, kernel_configs in (("attention", TB.BLOCK_CONFIGS), ("mlp", TB.MLP_CONFIGS)):
        for config in range(min(len(kernel_configs), configs or len(kernel_configs))):
            for shift in (0, 3):
                out.append(dict(kernel=kernel, xdtype=xdtype, width=width, config=config, shift=shift))
    return out


def run_case(case: dict, device: str = DEVICE, batch: int = 2) -> float:
    """One launch as the model makes it; the change to x against the fp32 reference path (rel. error).
    Also run by tests/triton_interpret_check.py on the CPU, under its bounds check."""
    import torch

    from swin.config import SwinConfig
    from swin.model import SwinTransformerBlock
    from swin.ops import fused_attention_half, fused_mlp_half
    from swin.ops import triton_window as T

    T.FORCE_CONFIG = case["config"]
    low = torch.bfloat16 if device == "cuda" else torch.float16
    cfg = SwinConfig(version=1, embed_dim=96, depths=(2,), num_heads=(3,), window_size=7, img_size=(224, 224),
                     drop_path_rate=0.0, backend="fused")
    torch.manual_seed(case["config"] * 10 + case["shift"])
    blk = SwinTransformerBlock(cfg, 96, 3, case["shift"], 0, 0.0).to(device).eval()
    x = torch.randn(batch, 56, case["width"], 96, device=device)
    with torch.no_grad():
        ref = (blk._shifted_window_attention(blk.norm1(x)) if case["kernel"] == "attention"
               else blk.mlp(blk.norm2(x)))
        half = fused_attention_half if case["kernel"] == "attention" else fused_mlp_half
        if case["xdtype"] == "fp32":
            with torch.autocast(device, dtype=low):
                out = half(blk, x)
        else:
            xb = x.to(low)
            out = half(blk.to(low), xb).float() - xb.float() + x
        if device == "cuda":
            torch.cuda.synchronize()
    d = out - x
    return float((d - ref).norm() / ref.norm())


def run_model() -> float:
    import torch

    import swin
    torch.manual_seed(0)
    low = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    model = swin.create_model("swin_t", backend="fused").to(DEVICE).eval()
    x = torch.randn(2, 3, 224, 224, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=low):
        out = model(x).float()
        model.set_backend("triton")
        ref = model(x).float()
    return float((out - ref).norm() / ref.norm())


def child(group: int, skip: int, configs: int | None) -> None:
    xdtype, width = GROUPS[group]
    for i, case in enumerate(cases(xdtype, width, configs)):
        if i < skip:
            continue
        print("start", i, json.dumps(case), flush=True)
        if os.environ.get("FUSED_PROBE_FAIL_AT") == f"{group}:{i}":  # tests: a process that dies mid-launch
            os.abort()
        err = run_case(case)
        print("done", i, json.dumps(dict(case, err=err)), flush=True)


def _run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """subprocess.run that turns a timeout into a failed run (returncode None) instead of raising."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, None, out, err + f"\ntimed out after {timeout}s")


def _sanitize(me: list[str], case: dict, configs: int | None, env: dict, timeout: int) -> str:
    """compute-sanitizer's memcheck on ``case`` (where the tool runs): it names the faulting access."""
    if not shutil.which("compute-sanitizer"):
        return ""
    g = GROUPS.index((case["xdtype"], case["width"]))
    i = cases(*GROUPS[g], configs).index(case)
    limit = ["--configs", str(configs)] if configs else []
    s = _run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "4"] + me +
             ["--child", str(g), "--skip", str(i)] + limit, env, timeout)
    return (s.stdout + s.stderr)[-6000:]


def _write(out: Path, rows: list[dict], model: str, sanitizer: str) -> list[str]:
    md = ["| half | x | map | config | shift | status | rel. error / error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "kernel" not in r:
            md.append(f"| {r['group']} | | | | | {r['status']} | {r.get('tail', '')[:100]} |")
            continue
        detail = f"{r['err']:.1e}" if r["status"] == "ok" else r["error"][:100]
        md.append(f"| {r['kernel']} | {r['xdtype']} | 56x{r['width']} | {r['config']} | {r['shift']} | "
                  f"{r['status']} | {detail} |")
    md.append(f"\nwhole Swin-T 224 x 224, batch 2, bf16 autocast, fused vs triton: {model}")
    if sanitizer:
        md.append("\ncompute-sanitizer memcheck on the first crash:\n```\n" + sanitizer + "\n```")
    (out / "fused_probe.md").write_text("\n".join(md) + "\n")
    (out / "fused_probe.json").write_text(json.dumps(dict(rows=rows, model=model, sanitizer=sanitizer), indent=1))
    return md


def parent(out: Path, timeout: int, groups: list[int], configs: int | None, with_model: bool,
           budget_s: float) -> int:
    """Each group in its own process(es); results written after each, so a kill keeps what ran.
    Order: the groups, compute-sanitizer as soon as a first crash is seen, the whole model last;
    no new process starts past ``budget_s``."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", SWIN_TRITON_TUNE="0")
    me = [sys.executable, str(Path(__file__).resolve())]
    limit = ["--configs", str(configs)] if configs else []
    rows, model, sanitizer = [], "not run", ""
    for g in groups:
        skip = 0
        while time.time() - t0 < budget_s:
            p = _run(me + ["--child", str(g), "--skip", str(skip)] + limit, env, timeout)
            lines = p.stdout.splitlines()
            rows += [dict(json.loads(ln.split(" ", 2)[2]), status="ok") for ln in lines if ln.startswith("done ")]
            if p.returncode == 0:
                break
            started = [ln for ln in lines if ln.startswith("start ")]
            if not started:  # died before a launch: nothing to resume
                rows.append(dict(group=GROUPS[g], status="process failed", tail=p.stderr[-800:]))
                break
            i, case = int(started[-1].split(" ", 2)[1]), json.loads(started[-1].split(" ", 2)[2])
            error = next((ln for ln in reversed(p.stderr.splitlines()) if "Error" in ln or "timed out" in ln),
                         p.stderr[-200:])
            rows.append(dict(case, status="CRASH", error=error.strip()[:200]))
            print(f"  crash in {case}: {error.strip()[:120]}", flush=True)
            if not sanitizer and p.returncode is not None:
                sanitizer = _sanitize(me, case, configs, env, min(timeout, 60))
            skip = i + 1
        _write(out, rows, model, sanitizer)
    if with_model and time.time() - t0 < budget_s:  # the whole model as it crashed in the bench
        tuned = {k: v for k, v in env.items() if k != "SWIN_TRITON_TUNE"}  # as the bench: every configuration timed
        p = _run(me + ["--model"], tuned, timeout)
        model = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else "CRASH: " + p.stderr.strip()[-300:]
    md = _write(out, rows, model, sanitizer)
    print("\n".join(md[: 2 + len(rows) + 2]))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/fused_probe")
    ap.add_argument("--timeout", type=int, default=90, help="seconds per process")
    ap.add_argument("--groups", default=",".join(str(i) for i in range(len(GROUPS))),
                    help=f"comma list of indices into {GROUPS} (input dtype, map width)")
    ap.add_argument("--configs", type=int, help="only the first N launch configurations of each kernel")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model case")
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no new process after this many seconds")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model:
        print(f"rel. error {run_model():.1e}")
        return 0
    if a.child is not None:
        child(a.child, a.skip, a.configs)
        return 0
    return parent(Path(a.out), a.timeout, [int(g) for g in a.groups.split(",")], a.configs, not a.no_model,
                  a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
