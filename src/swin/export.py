"""ONNX export for deployment (onnxruntime, TensorRT, OpenVINO, ...).

``export_onnx`` runs torch.onnx's exporter (``torch.export`` underneath) on the model's per-block
path, with the batch dimension dynamic and the image size fixed (the padding and the shift masks
depend on it; export once per input size). The graph takes ``pixel_values`` (N, 3, H, W), normalised
as the model was trained, and returns ``logits`` (N, classes). The weights are stored in the one
``.onnx`` file. Before the file is moved into place, onnxruntime (if installed) runs it on a fresh
input (for a dynamic batch, of another batch size) and its logits must equal the PyTorch model's within 1e-4 of their
scale; the file is written to a temporary name and renamed, so an existing file is never left half
written.

The exported graph keeps the shift mask's masked probabilities (~1e-44, subnormal) as the
references compute them; our CPU training path flushes them to 0 because Intel cores multiply
subnormals slowly (AMD's Zen 4, where this was measured, does not). On Intel, onnxruntime's session
option ``session.set_denormal_as_zero`` is the switch for that (not timed here).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

ONNX_EXTRA = "pip install 'swin[onnx]' (the onnx, onnxscript and onnxruntime packages)"
MAX_REL_ERR = 1e-4


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's helper packages log a line per empty attribute; keep a CLI's output readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (default: torch's)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"Running an ONNX file needs onnxruntime: {ONNX_EXTRA}.") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rel_err(out, ref: torch.Tensor) -> float:
    """max |out - ref| over max |ref|: the error relative to the logits' scale."""
    out = torch.as_tensor(out, dtype=torch.float64)
    ref = ref.detach().to(torch.float64).cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def export_module(module: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                  dynamic_batch: bool = True, opset: int | None = None, metadata: dict[str, str] | None = None,
                  legacy_fallback: bool = False) -> None:
    """Export ``module`` (x -> logits tensor) traced at ``example`` to ``path`` (weights inside the
    file). Used for our models and, by the benchmark, for the peers': ``legacy_fallback`` retries
    with the TorchScript exporter (static shapes, no metadata) where torch.export cannot trace the
    module (HF's Swin)."""
    try:
        import onnxscript  # noqa: F401  (the exporter's translation library)
    except ImportError:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {ONNX_EXTRA}.") from None
    opset = default_opset() if opset is None else opset
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    names = dict(input_names=["pixel_values"], output_names=["logits"])
    with _quiet_exporter():
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=opset,
                                        dynamic_shapes=shapes, **names)
        except Exception:
            if not legacy_fallback or dynamic_batch:
                raise
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=min(opset, 17), **names)
            return
    written = program.model.opset_imports.get("")
    if written != opset:  # torch.onnx leaves a graph it could not convert at its own opset, declared wrongly
        raise ValueError(f"torch.onnx could not write opset {opset} (its graph stayed at opset {written}); ask for an "
                         f"opset from 18 to {_max_opset()} (--opset).")
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=False)


def default_opset() -> int:
    """20 where torch.onnx writes it: GELU is one standard ``Gelu`` node from opset 20, where opset 18 has
    Div, Erf, Add and two Mul per block in an order onnxruntime does not fuse (Swin-T b8 on 2 CPU cores,
    onnxruntime 1.32: 1.04-1.05x; stop 25). Else 18."""
    return 20 if _max_opset() >= 20 else 18


def _max_opset() -> int:
    """The newest opset this torch.onnx converts to."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_MAX_OPSET", 18)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None,
                batch: int | None = None, opset: int | None = None, metadata: dict[str, str] | None = None,
                check: bool = True, force: bool = False) -> dict:
    """Write ``model`` (a :class:`swin.SwinTransformer`) to ``path`` as ONNX.

    ``img_size``: the input's (H, W) or side (default: the model's); any size the model takes.
    ``batch``: a fixed batch size, or None for a dynamic batch. ``metadata``: extra key/value strings
    stored in the file (the CLI stores the image size, the normalisation and the class names).
    ``check``: run the file in onnxruntime when it is installed and compare with the model.
    Returns {"path", "seconds", "max_rel_err" (None when not checked)}.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the path of the .onnx file to write.")
    if path.exists() and not force:
        raise ValueError(f"{path} already exists; choose another name or pass force=True (--force) to overwrite it.")
    weight = next(model.parameters())
    if weight.dtype != torch.float32:
        raise ValueError(f"The model is {weight.dtype}; export the fp32 model (model.float()): onnxruntime, TensorRT "
                         "and OpenVINO choose their own 16-bit precision from an fp32 graph.")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be a positive number or None (dynamic), got {batch}.")
    opset = default_opset() if opset is None else opset  # None: 20 (one Gelu node per block), or 18 on an older torch.onnx
    if opset < 18:  # torch.onnx's exporter writes opset 18 or later, whatever it is asked
        raise ValueError(f"opset must be 18 or later (torch.onnx's exporter writes no earlier opset), got {opset}.")
    size = img_size if img_size is not None else model.config.img_size
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    if H < 1 or W < 1:
        raise ValueError(f"img_size must be positive, got {H}x{W}.")
    device = weight.device
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch or 2, 3, H, W, generator=gen).to(device)
    meta = {"swin.img_size": f"{H},{W}", "swin.num_classes": str(model.num_classes),
            "swin.version": str(model.config.version), **(metadata or {})}
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.tmp{os.getpid()}"))  # as swin.train's atomic writes
    t0 = time.perf_counter()
    try:
        export_module(model, example, tmp, dynamic_batch=batch is None, opset=opset, metadata=meta)
        err = None
        if check and installed("onnxruntime"):
            x = torch.randn(batch or 3, 3, H, W, generator=gen)  # another batch size than the trace's
            with torch.inference_mode():
                ref = model(x.to(device)).float()
            out = onnx_session(tmp).run(None, {"pixel_values": x.numpy()})[0]
            err = rel_err(out, ref)
            if not err <= MAX_REL_ERR:
                raise RuntimeError(f"The exported graph's logits differ from the model's by {err:.2e} of their "
                                   f"scale (limit {MAX_REL_ERR:g}); {path} was not written.")
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "seconds": time.perf_counter() - t0, "max_rel_err": err}


def installed(*modules: str) -> bool:
    """Whether every named package can be imported (without importing it)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)
