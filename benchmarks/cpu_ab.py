"""A/B of the CPU C kernels (``swin/ops/cpu_kernels.py``) between two versions, in one process.

On the 2-core VM these kernels were tuned on, two versions timed in separate processes move by 3-5%
from run to run; alternated call by call (the kernel alone) or forward by forward (in a model) in one
process, a ratio repeats to ~1%. Each version is the kernel library built from ``cpu_kernels.py``'s C
source at a git revision ("-": the working tree), loaded side by side; the Python wrappers are this
tree's, so both versions must export the same entry points with the same arguments.

    PYTHONPATH=src python3 benchmarks/cpu_ab.py --a HEAD~1 --b - kernel
    PYTHONPATH=src python3 benchmarks/cpu_ab.py --a HEAD~1 --b - model --models swin_b,swin_t --pairs 12

``kernel``: window attention forward and backward alone, d = 32, at (windows, heads, N) shapes (default:
Swin-B's stage 3, a Swin-T-like stage 1, and window 8), inputs hot (one buffer) or rotated through six
(each larger than the L2 cache). ``model``: inference forwards of each model at batch 8, A and B
alternating; also the time spent in the attention kernel per forward. Ratios are A's time / B's:
above 1 means B is faster. Timings only; the tests check the kernels' values.
"""
from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "src/swin/ops/cpu_kernels.py"


def c_source(rev: str) -> str:
    """The C source (``_SOURCE``) of cpu_kernels.py at git revision ``rev``, or in the working tree ("-")."""
    if rev == "-":
        text = (ROOT / KERNELS).read_text()
    else:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{KERNELS}"], capture_output=True, text=True)
        except FileNotFoundError:
            raise ValueError(f"git cannot show {KERNELS} at {rev!r}: git is not installed; pass -") from None
        if done.returncode != 0:
            raise ValueError(f"git cannot show {KERNELS} at {rev!r}: {done.stderr.strip()}")
        text = done.stdout
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SOURCE" for t in node.targets):
            return node.value.value
    raise ValueError(f"no _SOURCE string in {KERNELS} at {rev!r}")


def build(source: str, tmp: Path, tag: str):
    """The library built from ``source`` as cpu_kernels builds it, with this tree's signatures."""
    from swin.ops import cpu_kernels as ck

    so = tmp / f"{tag}.so"
    ck.compile_source(source, so)
    return ck.load_library(so)


def interleave(calls: dict, rounds: int) -> dict:
    """Each callable once per round, the order reversed every other round: {name: [seconds, ...]}."""
    names, times = list(calls), {k: [] for k in calls}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
    return times


def pair_ratio(times: dict) -> float:
    """The median over rounds of A's time / B's."""
    return statistics.median(a / b for a, b in zip(times["A"], times["B"]))


def kernel_ab(libs: dict, shapes, rounds: int) -> list[str]:
    from swin.ops import cpu_kernels as ck

    lines = ["| kernel | windows x heads x N | inputs | A us | B us | A/B |", "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for windows, heads, n in shapes:
        d = 32
        pool = [torch.randn(windows, n, 3, heads, d, generator=g) for _ in range(6)]
        probs = torch.softmax(torch.randn(windows, heads, n, n, generator=g), -1)
        grad = torch.randn(windows, n, heads, d, generator=g)
        mask = torch.randn(windows, heads, n, n, generator=g)
        for kernel in ("forward", "backward"):
            for hot in (True, False):
                turn = {"i": 0}

                def call(lib, kernel=kernel, hot=hot):
                    qkv = pool[0 if hot else turn["i"] % len(pool)]
                    turn["i"] += 1
                    ck._lib = lib
                    q, k, v = qkv.unbind(2)
                    if kernel == "forward":
                        ck.window_attention(q, k, v, mask, d ** -0.5)
                    else:
                        ck.window_attention_backward(q, k, v, probs, grad, d ** -0.5)
                times = interleave({t: (lambda lib=lib: call(lib)) for t, lib in libs.items()}, rounds)
                a, b = (statistics.median(times[t]) * 1e6 for t in ("A", "B"))
                lines.append(f"| {kernel} | {windows} x {heads} x {n} | {'hot' if hot else 'rotated'} | {a:.0f} | {b:.0f} | "
                             f"{pair_ratio(times):.3f}x |")
    return lines


def model_ab(libs: dict, models, pairs: int, batch: int) -> list[str]:
    import swin
    from swin.ops import cpu_kernels as ck

    lines = ["| model, b%d | A ms | B ms | A/B | attention A / B ms |" % batch, "|---|---|---|---|---|"]
    for name in models:
        torch.manual_seed(0)
        model = swin.create_model(name).eval()
        x = torch.randn(batch, 3, *model.config.img_size)
        timed = {t: TimedAttention(lib) for t, lib in libs.items()}

        def forward(tag):
            ck._lib = timed[tag]
            model(x)
        with torch.inference_mode():
            for tag in libs:  # warm-up: packed weights, caches
                forward(tag)
                timed[tag].spent = 0.0
            times = interleave({t: (lambda t=t: forward(t)) for t in libs}, pairs)
        a, b = (statistics.median(times[t]) * 1e3 for t in ("A", "B"))
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {pair_ratio(times):.3f}x | "
                     f"{timed['A'].spent / pairs * 1e3:.1f} / {timed['B'].spent / pairs * 1e3:.1f} |")
    return lines


class TimedAttention:
    """A kernel library whose window-attention entry point adds its time to ``spent``."""

    def __init__(self, lib):
        self.lib, self.spent = lib, 0.0

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def swin_window_attention_f32(self, *args):
        t = time.perf_counter()
        self.lib.swin_window_attention_f32(*args)
        self.spent += time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", default="HEAD", help='git revision of version A ("-": the working tree)')
    p.add_argument("--b", default="-", help="git revision of version B")
    sub = p.add_subparsers(dest="mode", required=True)
    pk = sub.add_parser("kernel", help="the attention kernels alone")
    pk.add_argument("--shapes", default="32x16x49,32x4x49,32x16x64", help="windows x heads x N, comma-separated")
    pk.add_argument("--rounds", type=int, default=30)
    pm = sub.add_parser("model", help="inference forwards, A and B alternating")
    pm.add_argument("--models", default="swin_b,swin_t,swinv2_t_w8")
    pm.add_argument("--pairs", type=int, default=12)
    pm.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)

    from swin.ops import cpu_kernels as ck
    if not ck.available():
        print("cpu_ab: the CPU kernels do not build or run here (they need x86-64 with AVX-512 and a C compiler).")
        return 1
    built = ck._lib
    try:
        with tempfile.TemporaryDirectory() as tmp:
            libs = {t: build(c_source(rev), Path(tmp), t) for t, rev in (("A", args.a), ("B", args.b))}
            print(f"A = {args.a}, B = {args.b}; {torch.get_num_threads()} threads, torch {torch.__version__}")
            if args.mode == "kernel":
                shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
                if any(len(s) != 3 for s in shapes):
                    raise ValueError(f"--shapes takes windows x heads x N triples such as 32x16x49, got {args.shapes!r}")
                lines = kernel_ab(libs, shapes, args.rounds)
            else:
                lines = model_ab(libs, args.models.split(","), args.pairs, args.batch)
    finally:
        ck._lib = built
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
