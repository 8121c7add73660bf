"""Fast paths for window attention, chosen in one place.

Every fast path computes exactly what :meth:`swin.model.WindowAttention.forward` computes on its
reference path (pad -> roll -> partition -> attend -> reverse -> roll back -> crop); the reference
is the spec and ``tests/test_ops.py`` checks each backend against it, forward and backward.

Backends:
- ``"reference"``: the plain PyTorch path in ``model.py``.
- ``"sdpa"``: one gather for pad+shift+partition, ``F.scaled_dot_product_attention`` with one
  additive bias+mask of shape (1, nW*heads, N, N) broadcast over the batch (cached in eval), and one
  gather back for reverse+unshift+crop. Works on every device and dtype.
- ``"triton"``: fused Triton kernels (CUDA) that read q/k/v in token layout with the shift and
  window partition folded into index arithmetic, add bias and shift mask in the kernel, and write
  the output back in token layout (forward and backward). Windows of up to 64 tokens.
- ``"fused"``: as "triton", and in inference each half of a block with at most 128 channels as one
  kernel: LayerNorm, qkv, attention, projection and residual per window; LayerNorm, fc1, GELU, fc2
  and residual per tile of tokens (``triton_block.py``); in wider blocks fc1 + GELU as one product
  (``triton_linear.py``); opt-in until a GPU run shows it faster.
- ``"auto"`` (the default): triton on CUDA when Triton is importable and the window fits, eager
  or inside torch.compile (the kernels are custom operators there; H200, stop 9: 1.59x the SDPA
  path compiled for inference, 1.10x for training), sdpa otherwise (CPU, windows over 8).

Beside attention, every backend but "reference" also gets (each tested against the plain modules):
- ``mlp.py``: in training, the MLP keeps one hidden tensor (GELU recomputed in the backward).
- ``cpu_tiled.py``: CPU inference runs a stage's blocks a chunk of whole windows at a time, in cache.
"""
from __future__ import annotations

import os
import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# Read once at import: Triton itself reads it when the kernels are defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_TRITON: bool | None = None

BACKENDS = ("auto", "reference", "sdpa", "triton", "fused")


TRITON_MIN = (3, 6)  # the oldest Triton the kernels are tested with (torch 2.11's); 3.3 spills and mis-runs


def _triton_version(text: str) -> tuple[int, int]:
    parts = (text.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def triton_available() -> bool:
    """True if a Triton at least ``TRITON_MIN`` imports (kernels then run on CUDA, or on CPU with
    ``TRITON_INTERPRET=1``). An older one is left unused, once with a warning: SDPA runs instead."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton

            found = _triton_version(triton.__version__)
            _TRITON = found >= TRITON_MIN
            if not _TRITON:
                warnings.warn(f"swin's Triton kernels need Triton >= {'.'.join(map(str, TRITON_MIN))} (torch >= 2.11); "
                              f"found {triton.__version__}, so window attention runs through SDPA instead.",
                              RuntimeWarning, stacklevel=2)
        except Exception:  # pragma: no cover - depends on the install
            _TRITON = False
    return _TRITON


def check_backend(name: str) -> None:
    """Raise ValueError unless ``name`` is a known backend that can run here."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name in ("triton", "fused") and not triton_available():
        raise ValueError(f"backend={name!r} needs the triton package, version >= "
                         f"{'.'.join(map(str, TRITON_MIN))} (torch >= 2.11 installs one); use backend='sdpa' or "
                         "'auto' instead.")


def resolve_backend(name: str, x: torch.Tensor, window: int) -> str:
    """The backend that actually runs for ``name`` on input ``x``: auto/triton fall back cleanly."""
    if name in ("auto", "triton", "fused"):
        if not (x.is_cuda or _INTERPRET) or not triton_available():
            return "sdpa"
        from .triton_window import supports

        return "triton" if supports(x, window) else "sdpa"
    return name


_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: None)
_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)


def transforming() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, ...): its wrapped tensors have no storage
    for the C kernels, oneDNN or the caches to read, so every fast path steps aside for the plain modules."""
    return _functorch_level() is not None


def fast(backend: str) -> bool:
    """True when a module set to ``backend`` takes its fast path: any backend but "reference", outside
    torch.func transforms."""
    return backend != "reference" and not transforming()


# Caches derived from parameters (the eval-time attention bias, CPU-prepacked weights) hold the
# parameter tensors they were built from (weakly) and are current while the module still has those
# very tensors, at the same (data_ptr, _version, dtype), and no optimizer step was taken anywhere in
# the process since: fused optimizers (e.g. AdamW(fused=True)) update parameters in place without
# bumping their version counters. The identity matters: torch.func.functional_call hands in new
# tensors on every call, and one may sit at a freed one's address with version 0.
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def params_key(params) -> tuple:
    """What a cache derived from ``params`` must match to be current, besides the tensors' identity. An
    inference tensor (a model built under torch.inference_mode) keeps no version counter: in-place
    changes to one are seen only through load_state_dict or :func:`invalidate_caches`."""
    return (_OPTIMIZER_STEPS[0],) + tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype)
                                          for p in params)


# module -> {slot: (params_key, value)}. Outside the modules, so that copying, pickling or saving a
# model never carries a cache (nor an opaque oneDNN tensor).
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


CACHE_SLOTS, CACHE_BYTES = 32, 64 << 20  # a module keeps its last-used slots within both (and always its newest)


def cached(module: torch.nn.Module, slot, params, build):
    """``build()`` (a value derived from ``params``), computed once per state of those parameters and
    kept per (module, slot); built outside autograd and inference mode. A module keeps its most recently
    used slots, at most CACHE_SLOTS of them and CACHE_BYTES together (a detection loop over many image
    sizes: one attention bias + shift mask of a 1333 px map is ~40 MB)."""
    key = params_key(params)
    store = _CACHES.setdefault(module, {})
    hit = store.pop(slot, None)
    if hit is not None and hit[0] == key and all(ref() is p for ref, p in zip(hit[1], params)):
        store[slot] = hit  # now the most recently used
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # not inference tensors: autograd may save them
        value = build()
    # the entry also holds the parameters' storage as it was: `param.data = ...` (a submodule's .half() then
    # .float()) keeps the Parameter object and its version, and the new storage could otherwise land at the
    # old one's address
    store[slot] = (key, tuple(weakref.ref(p) for p in params), value, tuple(p.untyped_storage() for p in params),
                   _nbytes(value))
    while len(store) > 1 and (len(store) > CACHE_SLOTS or sum(e[4] for e in list(store.values())) > CACHE_BYTES):
        store.pop(next(iter(list(store))), None)  # the least recently used (lists: other threads may edit it)
    return value


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def param_as(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``module.<name>`` (a weight or bias) in ``dtype``, for inference: the parameter itself, or a
    copy made once and kept until the parameter changes (made afresh inside torch.compile)."""
    p = getattr(module, name)
    if p.dtype == dtype:
        return p
    if torch.compiler.is_compiling():
        return p.to(dtype)
    return cached(module, ("as", name, dtype), (p,), lambda: p.to(dtype))


def invalidate_caches() -> None:
    """Drop every parameter-derived cache; needed only after changing weights in a way PyTorch does
    not record: writing through ``param.data`` or raw storage, in place into the inference tensors of a
    model built under torch.inference_mode, by ``torch.distributed`` collectives straight into the
    parameters (``dist.broadcast(p, 0)``; DDP's own start-up broadcast is seen), or from another process
    into parameters in shared memory (``model.share_memory()``, Hogwild: call it in the process that
    reads them, after the writes). Optimizer steps, in-place tensor ops (``copy_`` under no_grad),
    ``load_state_dict`` and new tensors put in (torch.func.functional_call) are seen without it."""
    _OPTIMIZER_STEPS[0] += 1


def drop_caches(module: torch.nn.Module) -> None:
    """Forget the caches of ``module`` and everything in it (its weights were replaced: the entries would
    only hold the old weights' memory until rebuilt)."""
    for m in module.modules():
        _CACHES.pop(m, None)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs at on ``device_type`` right now, or None when it is off."""
    if device_type not in ("cpu", "cuda"):
        return None
    try:
        on, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        cpu = device_type == "cpu"
        on = torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()
        dtype = torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
    return dtype if on else None


def has_hooks(module: torch.nn.Module) -> bool:
    """True if ``module`` or anything inside it has forward (pre-)hooks, or backward (pre-)hooks while
    autograd records (Grad-CAM, K-FAC), or global module hooks are registered: fast paths that skip
    submodule calls then step aside, so hooks still fire."""
    from torch.nn.modules import module as _m

    backward = torch.is_grad_enabled()  # under no_grad / inference_mode no backward hook can fire
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or (backward and (
            getattr(_m, "_global_backward_hooks", None) or getattr(_m, "_global_backward_pre_hooks", None))):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or (backward and (m._backward_hooks or m._backward_pre_hooks))
               for m in module.modules())


def refuse_unsupported_backward(grad: torch.Tensor | None = None) -> None:
    """Called first in the backward of each autograd Function of the fast paths, with its incoming
    gradient. Those backwards are not differentiable themselves (oneDNN, C kernels, out= products), and a
    second derivative through them would miss their part silently where the residual connections give it
    another path; autograd runs a backward with grad mode on exactly when asked for one
    (``create_graph=True``). Nor do they take autograd's legacy batched gradients
    (``is_grads_batched=True``, ``jacobian(vectorize=True)``), which reach them as tensors without storage."""
    if torch.is_grad_enabled():
        raise RuntimeError("Second derivatives (create_graph=True) do not pass through swin's fast CPU kernels; "
                           "call model.set_backend('reference') for them.")
    if grad is not None and _legacy_batched is not None and not torch.compiler.is_compiling() and _legacy_batched(grad):
        raise RuntimeError("Batched gradients (torch.autograd.grad(is_grads_batched=True), "
                           "jacobian(vectorize=True)) do not pass through swin's fast CPU kernels; use "
                           "torch.func.jacrev or vmap over torch.func.grad (supported), vectorize=False, or "
                           "call model.set_backend('reference').")


def exporting() -> bool:
    """True while torch.export (torch.onnx's exporter too) or torch.jit.trace records a graph: one graph
    that must serve any batch, of standard operators (on a torch too old to tell export from compile:
    under either)."""
    if torch.jit.is_tracing():
        return True
    if not torch.compiler.is_compiling():
        return False
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is None or is_exporting()


def dropout_active(*modules: torch.nn.Module) -> bool:
    """True if any of these dropout / drop-path modules would drop now: in training mode with p > 0.
    Each module's own mode counts (Monte-Carlo dropout puts dropouts alone back in training mode)."""
    return any(m.training and getattr(m, "p", 0.0) > 0 for m in modules)


def block_dropout_active(blocks: torch.nn.Module) -> bool:
    """True if any dropout or drop-path module inside ``blocks`` would drop now."""
    return any(m.training and getattr(m, "p", 0.0) > 0 for m in blocks.modules()
               if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "DropPath")  # (model.py imports this file)


def is_plain(module: torch.nn.Module, cls: type) -> bool:
    """True if ``module`` is exactly a ``cls`` with no hooks. Only then may a fast path use its
    weights directly instead of calling it: a subclass or a replacement (a LoRA wrapper, a quantized,
    pruned or parametrized layer) computes something else and is called as a module."""
    return type(module) is cls and not has_hooks(module)


def window_attention(attn, x: torch.Tensor, window: int, shift: int, mask_padding: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, C): the shifted-window attention of ``attn`` (a WindowAttention),
    by the backend it names; the same function as its reference path."""
    backend = resolve_backend(attn.backend, x, window)
    if backend == "triton":
        from .triton_window import window_attention_triton

        return window_attention_triton(attn, x, window, shift, mask_padding)
    if backend == "sdpa":
        from .sdpa import window_attention_sdpa

        return window_attention_sdpa(attn, x, window, shift, mask_padding)
    raise ValueError(f"window_attention got backend {backend!r}; the reference path lives in WindowAttention.forward.")


def fused_block_eligible(blk, x: torch.Tensor) -> bool:
    """True when backend "fused" runs ``blk`` as two kernels, one per half (:mod:`.triton_block`)."""
    if not triton_available() or transforming():
        return False
    from .triton_block import mlp_eligible

    return mlp_eligible(blk, x)


def fused_attention_half(blk, x: torch.Tensor) -> torch.Tensor:
    from .triton_block import attention_half

    return attention_half(blk, x)


def fused_mlp_half(blk, x: torch.Tensor) -> torch.Tensor:
    from .triton_block import mlp_half

    return mlp_half(blk, x)


from .latency import compile_for_inference, CudaGraphRunner  # noqa: E402

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "window_attention", "triton_available", "has_hooks",
           "is_plain",
           "params_key", "cached", "invalidate_caches", "drop_caches", "fast", "transforming",
           "compile_for_inference", "CudaGraphRunner"]
