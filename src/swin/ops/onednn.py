"""Matrix products through oneDNN (PyTorch's ``mkldnn`` ops) where they are faster than ``addmm``.

On CPU, PyTorch's ``addmm``/``mm`` in fp32 run MKL's sgemm. On an AMD Zen 4 CPU (2-core EPYC VM)
MKL reached 0.75-0.95x oneDNN's rate at Swin's shapes, both for the products of the forward and for
the input gradient (g @ W); for the weight gradient (g^T @ x, a reduction over the tokens) MKL was the
faster of the two. On the Intel Xeon the library was tuned on earlier, the two were within 0.5% in
the model. So:

- inference (``cpu_tiled``) runs every product as one oneDNN call on a weight prepacked once;
- training in fp32 on CPU runs :func:`linear` here: the forward and the input gradient in oneDNN
  (on the weight as it is: it changes every step), the weight gradient with ``mm``.

The values are F.linear's to float rounding (tests/test_ops.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import windows as W
from . import autocast_dtype, refuse_unsupported_backward


@functools.lru_cache(maxsize=None)
def available(dtype: torch.dtype) -> bool:
    """oneDNN's linear ops are built into this PyTorch and run ``dtype`` on this CPU (asked once per
    dtype: every training product and every inference chunk checks it)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


USE_TRAINING = True  # set False to train with F.linear (MKL) instead


def training_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors with autograd recording, outside autocast, torch.compile and tracing."""
    return (USE_TRAINING and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and autocast_dtype("cpu") is None
            and not W.recording() and available(torch.float32))


def mm_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D contiguous ``x``, one oneDNN call, no autograd. (oneDNN reads a
    bias as contiguous memory: a strided one, a parameter made as a view, is copied first.)"""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None if bias is None else bias.contiguous(), "none", [],
                                              "none")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; in fp32 CPU training, oneDNN's product forward and backward."""
    if not training_eligible(x, weight):
        return F.linear(x, weight, bias)
    out = _Linear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return mm_t(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        refuse_unsupported_backward(grad)
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = mm_t(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ W
        dw = grad.t() @ x if ctx.needs_input_grad[1] else None  # MKL: faster here than oneDNN
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db
