"""Side-by-side benchmark: this package against timm, torchvision and HF transformers.

Inference throughput, training-step throughput (forward + backward + AdamW, with peak memory on
CUDA) and batch-1 latency, each implementation eager and, where asked, ``torch.compile``d.
Warm-up first (compilation stays out of the numbers), then interleaved rounds (every
implementation once per round, so load changes hit all alike), median and spread per entry, and
the ratio of each entry to the best peer measured in the same run. Inputs are fresh random
tensors, rotated among several sets. Writes a markdown table and JSON.

``--isolate`` builds, warms up and times each implementation in a fresh process in every round
(the order reversed every other round). On a CPU what ran earlier in a process moves the peers'
speed by up to ~20% (glibc hands multi-MB tensors back and forth with the OS depending on its
history); a fresh process is how a script runs one model.

    PYTHONPATH=src python3 benchmarks/bench.py --device cpu --models swin_t --modes infer,train
    swin bench --device cuda --dtype bf16 --compile
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train import atomic_savefig, atomic_write_text

# Our model name -> the peers' equivalents (random init: no weights are downloaded).
MODELS = {
    "swin_t": dict(size=224, timm="swin_tiny_patch4_window7_224", tv="swin_t",
                   hf=("swin", dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7))),
    "swin_s": dict(size=224, timm="swin_small_patch4_window7_224", tv="swin_s",
                   hf=("swin", dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7))),
    "swin_b": dict(size=224, timm="swin_base_patch4_window7_224", tv="swin_b",
                   hf=("swin", dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7))),
    "swinv2_t_w8": dict(size=256, timm="swinv2_tiny_window8_256", tv="swin_v2_t",
                        hf=("swinv2", dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=8))),
}
PEERS = ("timm", "timm-sdpa", "tv", "hf")


@dataclass
class Entry:
    model: str
    mode: str  # infer | train | latency
    impl: str
    batch: int
    unit: str  # img/s or ms
    samples: list[float] = field(default_factory=list)
    median: float | None = None
    spread: float | None = None  # (max - min) / median over rounds
    vs_best_peer: float | None = None  # median / best peer's median; > 1 is better, for both units
    paired_vs_best_peer: float | None = None  # median over rounds of the same-round ratio (robust to drift)
    peak_gib: float | None = None
    mem_vs_timm: float | None = None
    saved_gib: float | None = None  # training: activations autograd keeps for backward (any device)
    saved_vs_timm: float | None = None
    parity_rel_err: float | None = None
    host_share: float | None = None  # CUDA: host seconds to issue the steps / device seconds (~1: host-bound)
    host_samples: list[float] = field(default_factory=list)
    error: str | None = None


# -- building the implementations ------------------------------------------------------------
COMPILED = ("compile", "ro", "mat", "freeze")  # the flags that torch.compile the forward (slow to prepare)
FLAGS = COMPILED + ("graph", "cast", "plainmlp", "dpskip", "noltgelu", "ort")


BASES = ("ours", "ours-ref", "ours-sdpa", "ours-triton", "ours-fused", "timm", "timm-sdpa", "tv", "hf")


def check_impl(impl: str) -> None:
    """ValueError naming what is wrong with an implementation name like 'ours-sdpa+compile'."""
    base, flags = impl.split("+")[0], impl.split("+")[1:]
    if base not in BASES:
        raise ValueError(f"Unknown implementation {base!r} in {impl!r}; use one of {', '.join(BASES)}, each with "
                         f"optional flags {', '.join('+' + f for f in FLAGS)} (see --help).")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ValueError(f"Unknown flag(s) {', '.join('+' + f for f in unknown)} in {impl!r}; "
                         f"use {', '.join('+' + f for f in FLAGS)}.")


def _build(impl: str, name: str, drop_path: float) -> tuple[nn.Module, Callable]:
    """(module, forward fn x -> logits) for an implementation name like 'ours-sdpa' or 'timm'."""
    spec = MODELS[name]
    check_impl(impl)
    base, flags = impl.split("+")[0], impl.split("+")[1:]
    if base.startswith("ours"):
        import swin

        backend = base.split("-", 1)[1] if "-" in base else "auto"
        backend = "reference" if backend == "ref" else backend
        model = swin.create_model(name, drop_path_rate=drop_path, backend=backend)
        return model, model
    if base in ("timm", "timm-sdpa"):
        import timm

        model = timm.create_model(spec["timm"], pretrained=False, drop_path_rate=drop_path)
        for m in model.modules():  # timm's Swin SDPA path is "experimental" and off unless asked
            if hasattr(m, "fused_attn"):
                m.fused_attn = base == "timm-sdpa"
        return model, model
    if base == "tv":
        import torchvision

        model = getattr(torchvision.models, spec["tv"])(weights=None)
        depth = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        for i, m in enumerate(depth):  # its builder fixes the rate; use the same linear rule as the others
            m.p = drop_path * i / max(len(depth) - 1, 1)
        return model, model
    if base == "hf":
        import transformers

        kind, kw = spec["hf"]
        if kind == "swin":
            cfg = transformers.SwinConfig(image_size=spec["size"], num_labels=1000, drop_path_rate=drop_path, **kw)
            model = transformers.SwinForImageClassification(cfg)
        else:
            cfg = transformers.Swinv2Config(image_size=spec["size"], num_labels=1000, drop_path_rate=drop_path, **kw)
            model = transformers.Swinv2ForImageClassification(cfg)
        return model, lambda x: model(pixel_values=x).logits
    raise ValueError(f"Unknown implementation {impl!r}; use ours[-ref|-sdpa|-triton|-fused], timm, timm-sdpa, tv or hf, "
                     "with an optional +compile, +graph (CUDA graph), +ro (compile reduce-overhead), +mat (max-autotune) "
                     "or +cast (a 16-bit model).")


def _autocast(device: str, dtype: torch.dtype, cache: bool = True):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    # CUDA-graph capture needs the autocast weight cache off (torch.cuda.graph docs)
    return torch.autocast(device_type=device, dtype=dtype, cache_enabled=cache)


class _Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.host_share = None  # CUDA: the last call's host issue time / its device time

    def __call__(self, fn: Callable[[int], None], iters: int) -> float:
        """Seconds per call of fn(i), i = 0..iters-1 (CUDA events around the loop on GPU). On CUDA
        also ``host_share``: how long the host took to issue the calls over how long the device took
        to run them; near 1 the host is the bottleneck (launch overhead), well under 1 the device."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            host = time.perf_counter() - t0
            end.synchronize()
            device = start.elapsed_time(end) / 1e3
            self.host_share = host / device
            return device / iters
        t0 = time.perf_counter()
        for i in range(iters):
            fn(i)
        return (time.perf_counter() - t0) / iters


# -- the three measurements ------------------------------------------------------------------
def _train_peak_bytes(step, base: int, base_reserved: int) -> int:
    """The memory two training steps hold over what was there before the model was built: weights,
    optimizer state, activations and CUDA-graph pools. A graph's replays allocate nothing (its private
    pool was filled while it was recorded), so their peak of allocated memory leaves the pool out (stop
    25: 0.32 GiB for a Swin-T b128 step under reduce-overhead); the pool stays reserved after
    ``empty_cache()``, which frees every other unused block. The larger of the two counts."""
    torch.cuda.reset_peak_memory_stats()
    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    return max(allocated, torch.cuda.memory_reserved() - base_reserved)


def _prepare(impl: str, name: str, mode: str, device: str, dtype: torch.dtype, batch: int, drop_path: float,
             inputs: list[torch.Tensor]):
    """A callable step(i) for one implementation, warmed up; plus bookkeeping for memory/parity."""
    torch.manual_seed(0)
    model, fwd = _build(impl, name, drop_path)
    model.to(device)
    flags = impl.split("+")[1:]
    if "cast" in flags:  # a 16-bit model (weights and input in dtype) instead of autocast over fp32
        if dtype == torch.float32:
            raise ValueError(f"{impl}: +cast needs --dtype bf16 or fp16")
        model.to(dtype)
        inputs = [x.to(dtype) for x in inputs]
        dtype = torch.float32  # no autocast around it (see _autocast)
    if "plainmlp" in flags:  # ours with autograd's plain MLP (GELU output kept): A/B of swin.ops.mlp
        if not impl.startswith("ours"):
            raise ValueError(f"+plainmlp applies to ours only, not {impl!r}")
        for m in model.modules():
            if hasattr(m, "fc1") and hasattr(m, "backend"):
                m.backend = "reference"
    if "dpskip" in flags:  # ours skipping dropped samples on CUDA too (eager; swin.model.DropPath.residual)
        if not impl.startswith("ours"):
            raise ValueError(f"+dpskip applies to ours only, not {impl!r}")
        from swin.model import DropPath

        for m in model.modules():
            if isinstance(m, DropPath):
                m.SKIP_DEVICES = ("cpu", "cuda")
    if "noltgelu" in flags:  # ours without fc1 + GELU as one cuBLASLt call (the default in 16-bit CUDA
        # inference, swin.ops.mlp): the A/B of that call
        if not impl.startswith("ours"):
            raise ValueError(f"+noltgelu applies to ours only, not {impl!r}")
        from swin.model import Mlp

        for m in model.modules():
            if isinstance(m, Mlp):
                m.LT_GELU_DEVICES = ()
    if "compile" in flags:
        fwd = torch.compile(fwd)
    elif "ro" in flags:
        fwd = torch.compile(fwd, mode="reduce-overhead")
    elif "mat" in flags:  # inductor benchmarks Triton product templates (epilogues fused) against cuBLAS
        fwd = torch.compile(fwd, mode="max-autotune")
    elif "freeze" in flags:  # inference only: weights become constants (prepacked, folded) for inductor
        fwd = torch.compile(fwd, options={"freezing": True})
    info: dict = {"model": model, "fwd": fwd}
    if "ort" in flags:  # the model exported to ONNX and run by onnxruntime: a deployment peer
        step, info["ort_rel_err"] = _ort_step(impl, model, fwd, device, dtype, inputs)
        return step, info
    if mode == "train":
        model.train()
        labels = [torch.randint(0, 1000, (batch,), device=device) for _ in inputs]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)  # the same for all

        def step(i: int) -> None:
            with _autocast(device, dtype):
                loss = F.cross_entropy(fwd(inputs[i % len(inputs)]).float(), labels[i % len(labels)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        info["opt"] = opt
    else:
        model.eval()
        if "graph" in flags:
            if device != "cuda":
                raise ValueError("+graph needs CUDA")
            from swin.ops import CudaGraphRunner

            with _autocast(device, dtype, cache=False):
                runner = CudaGraphRunner(lambda x: fwd(x), inputs[0])

            def step(i: int) -> None:
                runner(inputs[i % len(inputs)])
        else:
            def step(i: int) -> None:
                with torch.inference_mode(), _autocast(device, dtype):
                    out = fwd(inputs[i % len(inputs)])
                if i == 0 and not torch.isfinite(out.float()).all():
                    raise RuntimeError(f"{impl}: non-finite logits")
    return step, info


class _Logits(nn.Module):
    """x -> logits tensor for any implementation (HF's forward returns an output object)."""

    def __init__(self, model: nn.Module, fwd: Callable):
        super().__init__()
        self.model, self.fwd = model, fwd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fwd(x)


def _ort_step(impl: str, model: nn.Module, fwd: Callable, device: str, dtype: torch.dtype,
              inputs: list[torch.Tensor]) -> tuple[Callable[[int], None], float]:
    """+ort: export the eval-mode model at the run's batch (static shapes, onnxruntime's best case),
    check that onnxruntime's logits equal the PyTorch model's (the error is returned with the step),
    and time session.run on the inputs.
    onnxruntime runs with torch's thread count and its default graph optimisations."""
    from .export import MAX_REL_ERR, export_module, onnx_session, rel_err

    if device != "cpu" or dtype != torch.float32:
        raise ValueError(f"{impl}: +ort runs onnxruntime's CPU provider in fp32; use --device cpu --dtype fp32")
    model.eval()
    with tempfile.TemporaryDirectory(prefix="swin_bench_onnx_") as tmp:
        path = Path(tmp) / "model.onnx"
        export_module(_Logits(model, fwd).eval(), inputs[0], path, dynamic_batch=False, legacy_fallback=True)
        session = onnx_session(path)  # holds the graph in memory: the file can go
    arrays = [x.numpy() for x in inputs]
    with torch.inference_mode():
        err = rel_err(session.run(None, {"pixel_values": arrays[0]})[0], fwd(inputs[0]).float())
    if not err <= MAX_REL_ERR:
        raise RuntimeError(f"{impl}: onnxruntime's logits differ from the model's by {err:.1e} of their scale")

    def step(i: int) -> None:
        session.run(None, {"pixel_values": arrays[i % len(arrays)]})

    return step, err


def _saved_activation_bytes(info: dict, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward
    (parameters excluded): the activation memory of a step, deterministic and on any device."""
    model, seen = info["model"], {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(x.device.type, dtype):
        out = info["fwd"](x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _parity(name: str, impl: str, device: str, dtype: torch.dtype, x: torch.Tensor) -> float:
    """Relative error of our fast backend's logits against our reference path (same weights)."""
    import copy

    import swin

    backend = impl.split("+")[0].split("-", 1)[1] if "-" in impl.split("+")[0] else "auto"
    torch.manual_seed(0)
    ref = swin.create_model(name, backend="reference").to(device).eval()
    fast = copy.deepcopy(ref)
    fast.set_backend("reference" if backend == "ref" else backend)
    with torch.inference_mode():
        r = ref(x[:2].float()).double()
        if "cast" in impl.split("+")[1:]:  # the 16-bit model against the fp32 reference
            f = fast.to(dtype)(x[:2].to(dtype)).double()
        else:
            with _autocast(device, dtype):
                f = fast(x[:2]).double()
    return ((f - r).norm() / r.norm()).item()


def run_mode(name: str, mode: str, impls: list[str], args, log) -> list[Entry]:
    if args.isolate:
        return _run_isolated(name, mode, impls, args, log)
    device, dtype = args.device, _DTYPES[args.dtype]
    batch = {"infer": args.batch_infer, "train": args.batch_train, "latency": 1}[mode]
    size = MODELS[name]["size"]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    inputs = [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(3)]
    timer = _Timer(device)
    unit = "ms" if mode == "latency" else "img/s"
    entries, steps = [], {}
    for impl in filter(lambda i: _applies(i, mode), impls):
        e = Entry(name, mode, impl, batch, unit)
        entries.append(e)
        _LIVE.append(e)
        compiled = bool(set(COMPILED) & set(impl.split("+")[1:]))
        # past the budget, skip what compiles (slow to prepare); cheap eager entries still run
        if _over_budget(args, 1.0 if compiled else 1.3):
            e.error = "skipped: time budget"
            continue
        missing = missing_packages(impl)
        if missing:  # a peer named in --impls without its package: one line, no traceback
            e.error = _install_hint(missing)
            log(f"  skipped {name} {mode} {impl}: {e.error}")
            continue
        try:
            t0 = time.perf_counter()
            if device == "cuda":
                gc.collect()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            step, info = _prepare(impl, name, mode, device, dtype, batch, args.drop_path, inputs)
            for i in range(args.warmup):
                step(i)
            if device == "cuda":
                torch.cuda.synchronize()
                if mode == "train":
                    e.peak_gib = _train_peak_bytes(step, base, base_reserved) / 2**30
            if mode == "train" and not compiled:
                e.saved_gib = _saved_activation_bytes(info, inputs[0], dtype) / 2**30
            if "ort_rel_err" in info:  # +ort: onnxruntime against its PyTorch model
                e.parity_rel_err = info["ort_rel_err"]
            elif impl.startswith("ours") and mode != "train" and args.parity:
                e.parity_rel_err = _parity(name, impl, device, dtype, inputs[0])
            steps[impl] = step
            log(f"  ready {name} {mode} {impl} in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:  # one broken implementation must not stop the run
            e.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            detail = "" if isinstance(exc, ImportError) else "\n" + traceback.format_exc()  # the message says it all
            log(f"  FAILED {name} {mode} {impl}: {e.error}{detail}")
    iters = args.iters if mode != "latency" else args.iters * 5
    for r in range(args.rounds):
        if _over_budget(args) and r >= 2:
            log("  time budget reached: stopping rounds early")
            break
        for e in entries if r % 2 == 0 else entries[::-1]:  # no one always first (or last) in a round
            if e.impl not in steps:
                continue
            try:
                sec = timer(steps[e.impl], iters)
                e.samples.append(sec * 1e3 if unit == "ms" else batch / sec)
                if timer.host_share is not None:
                    e.host_samples.append(timer.host_share)
            except Exception as exc:
                e.error = f"{type(exc).__name__}: {exc}"[:200]
                steps.pop(e.impl)
    _summarise(entries)
    steps.clear()
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return entries


def _applies(impl: str, mode: str) -> bool:
    """CUDA graphs (+graph) time latency only; training is not timed with freezing, a 16-bit model
    (+cast: training keeps fp32 weights under autocast) or onnxruntime (+ort). Training with reduce-overhead (+ro: the
    compiled forward and backward replayed as CUDA graphs, the optimizer outside) is timed."""
    flags = set(impl.split("+")[1:])
    return not ((mode != "latency" and "graph" in flags)
                or (mode == "train" and {"graph", "freeze", "cast", "ort"} & flags))


def _run_isolated(name: str, mode: str, impls: list[str], args, log) -> list[Entry]:
    """run_mode with every (round, implementation) in a fresh process: ``--rounds 1`` of this same
    benchmark, whose single sample (and, from round 0, memory and parity) joins the entry here."""
    batch = {"infer": args.batch_infer, "train": args.batch_train, "latency": 1}[mode]
    entries = [Entry(name, mode, impl, batch, "ms" if mode == "latency" else "img/s")
               for impl in impls if _applies(impl, mode)]
    _LIVE.extend(entries)
    for e in entries:
        missing = missing_packages(e.impl)
        if missing:
            e.error = _install_hint(missing)
            log(f"  skipped {name} {mode} {e.impl}: {e.error}")
    src = str(Path(__file__).resolve().parents[1])  # the folder holding this package, for the child
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    for r in range(args.rounds):
        if _over_budget(args) and r >= 2:
            log("  time budget reached: stopping rounds early")
            break
        for e in entries if r % 2 == 0 else entries[::-1]:
            if e.error or (r == 0 and _over_budget(args, 1.3)):
                e.error = e.error or "skipped: time budget"
                continue
            with tempfile.TemporaryDirectory(prefix="swin_bench_") as tmp:
                cmd = [sys.executable, "-m", "swin.bench", *_child_argv(args, name, mode, e.impl, parity=r == 0),
                       "--out", tmp]
                t0, stderr = time.perf_counter(), ""
                try:
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout_s)
                    stderr = proc.stderr
                    child = json.loads((Path(tmp) / "bench.json").read_text())["entries"][0]
                except (subprocess.TimeoutExpired, OSError, ValueError, KeyError, IndexError) as exc:
                    last = stderr.strip().splitlines()[-1:]
                    e.error = f"isolated run failed: {type(exc).__name__} {' '.join(last)}"[:200]
                    log(f"  FAILED {name} {mode} {e.impl} (round {r}): {e.error}")
                    continue
            if child["error"] or not child["samples"]:
                e.error = child["error"] or "no sample"
                log(f"  FAILED {name} {mode} {e.impl}: {e.error}")
                continue
            e.samples.append(child["samples"][0])
            e.host_samples += child.get("host_samples", [])
            if r == 0:
                e.peak_gib, e.saved_gib, e.parity_rel_err = child["peak_gib"], child["saved_gib"], child["parity_rel_err"]
            log(f"  round {r} {name} {mode} {e.impl}: {child['samples'][0]:.2f} {e.unit} "
                f"(fresh process, {time.perf_counter() - t0:.1f}s)")
    _summarise(entries)
    return entries


def _child_argv(args, name: str, mode: str, impl: str, parity: bool) -> list[str]:
    """This run's settings for one (model, mode, implementation) and one round, no isolation."""
    argv = ["--device", args.device, "--dtype", args.dtype, "--models", name, "--modes", mode, "--impls", impl,
            "--rounds", "1", "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--batch-infer", str(args.batch_infer), "--batch-train", str(args.batch_train),
            "--drop-path", str(args.drop_path)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if not (parity and args.parity):
        argv.append("--no-parity")
    return argv


def _summarise(entries: list[Entry]) -> None:
    for e in entries:
        if e.samples:
            e.median = statistics.median(e.samples)
            e.spread = (max(e.samples) - min(e.samples)) / e.median
        if e.host_samples:
            e.host_share = statistics.median(e.host_samples)
    peers = [e for e in entries if e.median and e.impl.split("+")[0] in PEERS]
    if not peers:
        return
    lower_better = entries[0].unit == "ms"
    best = min(e.median for e in peers) if lower_better else max(e.median for e in peers)
    timm_mem = [e.peak_gib for e in entries if e.peak_gib and e.impl.split("+")[0] == "timm"]
    best_e = next(e for e in peers if e.median == best)
    for e in entries:
        if e.median:
            e.vs_best_peer = best / e.median if lower_better else e.median / best
            pairs = [(b / a if lower_better else a / b) for a, b in zip(e.samples, best_e.samples)]
            e.paired_vs_best_peer = statistics.median(pairs) if pairs else None
        if e.peak_gib and timm_mem:
            e.mem_vs_timm = e.peak_gib / min(timm_mem)
        timm_saved = [t.saved_gib for t in entries if t.saved_gib and t.impl.split("+")[0] == "timm"]
        if e.saved_gib and timm_saved:
            e.saved_vs_timm = e.saved_gib / min(timm_saved)


# -- reporting -------------------------------------------------------------------------------
def _triton_choices() -> list:
    """The Triton launch configuration chosen for each input signature so far (swin.ops.triton_window)."""
    mod = sys.modules.get("swin.ops.triton_window")
    if mod is None:
        return []
    return [{"kind": k[0], "signature": str(k[1]), "config": v} for k, v in mod.choices().items()]


def machine_info(device: str) -> dict:
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for mod in ("timm", "transformers", "torchvision", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:  # whether ours runs its C kernels here (fp32) or falls back to PyTorch's paths
        from swin.ops import cpu_kernels

        info["swin_cpu_kernels"] = cpu_kernels.available()
    info["threads"] = torch.get_num_threads()
    return info


def to_markdown(entries: list[Entry], info: dict, args) -> str:
    cpu_kernels = {True: " (ours: C kernels)", False: " (ours: no C kernels)"}.get(info.get("swin_cpu_kernels"), "")
    head = (f"{info['date']} | {info.get('gpu') or 'CPU x' + str(info['cpu_count']) + cpu_kernels} | torch {info['torch']} | "
            f"{args.dtype} | rounds {args.rounds} x iters {args.iters}"
            f"{' | each round in fresh processes' if getattr(args, 'isolate', False) else ''}")
    lines = [f"### {head}", ""]
    key = None
    for e in entries:
        if (e.model, e.mode) != key:
            key = (e.model, e.mode)
            lines += ["", f"**{e.model} {e.mode}, batch {e.batch}** ({e.unit}; median of rounds; spread = (max-min)/median)", "",
                      "| impl | median | spread | vs best peer | paired | peak GiB | mem vs timm | saved GiB | saved vs timm | parity rel err | host/device |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
        if e.median is None:
            lines.append(f"| {e.impl} | {e.error or 'not run'} | | | | | | | | | |")
            continue
        f = (lambda v, p=2, unit="": "" if v is None else f"{v:.{p}f}{unit}")
        lines.append(f"| {e.impl} | {e.median:,.2f} | {e.spread:.0%} | {f(e.vs_best_peer, unit='x')} | {f(e.paired_vs_best_peer, unit='x')} | {f(e.peak_gib)} | "
                     f"{f(e.mem_vs_timm)} | {f(e.saved_gib)} | {f(e.saved_vs_timm)} | {'' if e.parity_rel_err is None else f'{e.parity_rel_err:.1e}'} | {f(e.host_share)} |")
    return "\n".join(lines) + "\n"


def to_png(entries: list[Entry], info: dict, args, path: Path) -> None:
    """One horizontal bar chart per (model, mode): each implementation's median, the bar's whisker
    its min..max over rounds, labelled with its ratio to the best peer; ours in one colour, peers in
    another. Written to a temporary file and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for e in entries:
        if e.median is not None:
            groups.setdefault((e.model, e.mode), []).append(e)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.45 * sum(len(g) for g in groups.values()) + 1.2 * len(groups)),
                             squeeze=False)
    for ax, ((model, mode), group) in zip(axes[:, 0], groups.items()):
        names = [e.impl for e in group]
        lo = [e.median - min(e.samples) for e in group]
        hi = [max(e.samples) - e.median for e in group]
        colours = ["tab:blue" if e.impl.startswith("ours") else "tab:gray" for e in group]
        ax.barh(names, [e.median for e in group], xerr=[lo, hi], color=colours, capsize=3)
        for y, e in enumerate(group):
            if e.vs_best_peer is not None:
                ax.text(max(e.samples), y, f"  {e.vs_best_peer:.2f}x", va="center", fontsize=8)
        ax.invert_yaxis()
        better = "higher is better" if group[0].unit == "img/s" else "lower is better"
        ax.set_title(f"{model} {mode}, batch {group[0].batch} ({group[0].unit}, {better}; label: vs best peer)",
                     fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    fig.suptitle(f"{info.get('gpu') or 'CPU x' + str(info['cpu_count'])}, torch {info['torch']}, {args.dtype}, "
                 f"{info['date']}", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_START = [0.0]


_LIVE: list[Entry] = []  # every entry created so far, for a partial report if the run is killed


def _over_budget(args, factor: float = 1.0) -> bool:
    return args.budget_s > 0 and time.perf_counter() - _START[0] > args.budget_s * factor


def _has_onnx() -> bool:
    return not missing_packages("ours+ort")


_PEER_PACKAGES = {"timm": ("timm",), "timm-sdpa": ("timm",), "hf": ("transformers",)}


def missing_packages(impl: str) -> list[str]:
    """The packages an implementation needs that are not installed (the peers come with swin[bench])."""
    from .export import installed

    base, flags = impl.split("+")[0], impl.split("+")[1:]
    need = list(_PEER_PACKAGES.get(base, ()))
    if "ort" in flags:
        need += ["onnx", "onnxscript", "onnxruntime"]
    return [m for m in need if not installed(m)]


def _install_hint(missing: list[str]) -> str:
    return f"{', '.join(missing)} not installed: pip install 'swin[bench]'"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swin bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--models", default="swin_t", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", default="infer,train,latency", help="comma list of infer, train, latency")
    p.add_argument("--impls", default=None,
                   help="comma list, e.g. ours,ours-ref,ours-sdpa,ours-triton,ours-fused,ours+graph,timm,timm+compile,tv,hf "
                        "(+compile: torch.compile, +ro: compile reduce-overhead, +mat: compile max-autotune, +freeze: compile with inductor freezing (inference), +graph: our CUDA-graph runner, "
                        "+cast: the model and input in --dtype instead of autocast (inference), "
                        "+plainmlp: ours with the plain MLP instead of GELU recomputation, "
                        "+dpskip: ours skipping drop-path-dropped samples on CUDA too, as it does on CPU, "
                        "+noltgelu: ours without its default fc1 + GELU (tanh form) as one cuBLASLt call in 16-bit CUDA inference, "
                        "+ort: the model exported to ONNX and run by onnxruntime (CPU, fp32, inference; "
                        "timm+ort, tv+ort and hf+ort count as peers))")
    p.add_argument("--compile", action="store_true", help="add +compile variants of ours, timm and hf")
    p.add_argument("--batch-infer", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--batch-train", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=None, help="calls per round (latency: 5x this)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--drop-path", type=float, default=0.1, help="the same drop-path rate for every model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--budget-s", type=float, default=0, help="stop preparing new entries after this many seconds")
    p.add_argument("--no-parity", dest="parity", action="store_false")
    p.add_argument("--isolate", action="store_true",
                   help="every implementation in a fresh process in every round (CPU: what ran earlier in a "
                        "process moves the peers' speed by up to ~20%%)")
    p.add_argument("--child-timeout-s", type=float, default=1800, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md and bench.png")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    for flag, value, low in (("--batch-infer", a.batch_infer, 1), ("--batch-train", a.batch_train, 1),
                             ("--iters", a.iters, 1), ("--threads", a.threads, 1), ("--rounds", a.rounds, 1),
                             ("--warmup", a.warmup, 0)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("infer", "train", "latency") for m in modes):
        p.error(f"--modes takes a comma list of infer, train, latency; got {a.modes!r}")
    a.modes = ",".join(modes)
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.batch_infer = a.batch_infer or (256 if cuda else 8)
    a.batch_train = a.batch_train or (128 if cuda else 8)
    a.iters = a.iters or (10 if cuda else 2)
    if a.impls is None:
        # the compiled peers are the fastest ones on both devices: a comparison without them flatters us;
        # on CUDA each compiled mode ours is timed in, the peers are too (+ro: CUDA graphs, stop 15)
        a.impls = ("ours,ours+compile,ours+ro,ours+graph,timm,timm-sdpa,timm+compile,timm-sdpa+compile,timm-sdpa+ro,tv,hf"
                   if cuda
                   else "ours,ours-ref,timm,timm-sdpa,timm-sdpa+compile,tv,hf,hf+compile")
        if not cuda and _has_onnx():  # deployment on a CPU: the models in onnxruntime are peers too
            a.impls += ",timm+ort,tv+ort,hf+ort"
        if a.compile:
            a.impls += ",ours+compile,timm+compile,timm-sdpa+compile,hf+compile"
        a.impls = ",".join(dict.fromkeys(a.impls.split(",")))  # once each, in order
        # the default field leaves out the peers whose packages are missing, and says so once
        left_out = {i: missing_packages(i) for i in a.impls.split(",")}
        left_out = {i: m for i, m in left_out.items() if m}
        if left_out:
            missing = sorted({m for ms in left_out.values() for m in ms})
            print(f"note: {_install_hint(missing)}; left out of the comparison: {', '.join(left_out)}",
                  file=sys.stderr)
            a.impls = ",".join(i for i in a.impls.split(",") if i not in left_out)
    for m in a.models.split(","):
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for impl in a.impls.split(","):
        try:
            check_impl(impl.strip())
        except ValueError as e:
            p.error(str(e))
        if "graph" in impl.strip().split("+")[1:] and not cuda:
            p.error(f"{impl.strip()}: +graph (a CUDA graph) needs --device cuda")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown table; write bench.json, bench.md and bench.png under --out."""
    args = parse_args(argv)
    _START[0] = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "bench.log", "a") if out else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    info = machine_info(args.device)
    log(f"bench: {json.dumps(info)}")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    _LIVE.clear()

    def write() -> str:
        by_mode: dict = {}
        for e in _LIVE:  # summarise what was measured so far (also after a kill)
            by_mode.setdefault((e.model, e.mode), []).append(e)
        for group in by_mode.values():
            _summarise(group)
        md = to_markdown(_LIVE, info, args)
        if out:
            atomic_write_text(out / "bench.json", json.dumps({"machine": info, "args": vars(args),
                                                          "entries": [asdict(e) for e in _LIVE],
                                                          "triton_configs": _triton_choices()}, indent=1))
            atomic_write_text(out / "bench.md", md)
            try:
                to_png(_LIVE, info, args, out / "bench.png")
            except Exception as exc:  # the chart is a convenience; the numbers are already written
                # (also a matplotlib left half-imported by a SIGTERM that landed during its import)
                log(f"bench.png skipped: {type(exc).__name__}: {exc}")
        return md

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep the rounds measured so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for name in args.models.split(","):
            for mode in args.modes.split(","):
                log(f"== {name} {mode}")
                try:
                    run_mode(name, mode, impls, args, log)
                except Exception:
                    log(traceback.format_exc())
                write()
    except KeyboardInterrupt:
        log("interrupted: writing partial results")
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
