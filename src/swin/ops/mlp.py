"""Training-time MLP, fc2(GELU(fc1(x))), that keeps one hidden tensor instead of two.

Autograd on the plain MLP saves fc1's output for GELU's backward *and* GELU's output for fc2's
backward: two (tokens x 4C) tensors per block, the largest activations of the model. This
function saves only fc1's output and recomputes GELU from it in the backward pass (one cheap
elementwise pass), so training stores 4C fewer values per token per block.

On CPU it also walks the tokens in chunks: GELU, fc2 and the whole backward (GELU again, its
gradient, the three products) then run on chunk-sized buffers that stay in cache, instead of
allocating fresh (tokens x 4C) tensors (each page faulted in from the OS) and streaming GELU and its
gradient through memory; in fp32 the recomputed GELU and its gradient are one pass of a small C
kernel (``cpu_kernels.gelu_and_grad_``: one erf and one exp per element instead of two and one).
On CUDA one chunk is the whole batch.

The values are the reference MLP's (same products, same GELU); gradients equal it to float
rounding (tests/test_ops.py). Used for every backend but "reference" when autograd is on, the
MLP has no dropout and no forward or backward hooks (nor global module hooks); not inside
torch.compile (inductor makes its own recompute choices).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import windows as W
from . import autocast_dtype, cpu_kernels, dropout_active, fast, has_hooks, onednn, refuse_unsupported_backward

CPU_CHUNK_TOKENS = 2048


def eligible(mlp, x: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and fast(mlp.backend) and not W.recording()
            and not dropout_active(mlp.drop1, mlp.drop2) and plain_mlp(mlp) and not has_hooks(mlp)
            and x.numel() > 0)


def plain_mlp(mlp) -> bool:
    """fc1 and fc2 exactly ``nn.Linear`` and the exact (erf) GELU between them: what the fast paths
    compute from the weights. A LoRA wrapper, a quantized layer or another activation is called.
    (Types only: callers check the hooks of the whole subtree once, with ``has_hooks``.)"""
    return (type(mlp.fc1) is torch.nn.Linear and type(mlp.fc2) is torch.nn.Linear
            and type(mlp.act) is torch.nn.GELU and mlp.act.approximate == "none")


def mlp_recompute_gelu(mlp, x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C): ``mlp.fc2(GELU(mlp.fc1(x)))`` with GELU recomputed in the backward."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:  # run the function at autocast's precision, as F.linear would
        x, params = x.to(dtype), tuple(None if p is None else p.to(dtype) for p in params)
    chunk = max(1, x.numel() // x.shape[-1]) if x.is_cuda else CPU_CHUNK_TOKENS
    x2 = x.reshape(-1, x.shape[-1])
    dnn = onednn.training_eligible(x2, params[0])  # fp32 CPU: the products of both passes through oneDNN
    with torch.autocast(x.device.type, enabled=False):
        out = _RecomputeGeluMlp.apply(x2.contiguous() if dnn else x2, *params, chunk, dnn)
    return out.view(*x.shape[:-1], out.shape[-1])


class _RecomputeGeluMlp(torch.autograd.Function):
    """With ``dnn`` (fp32 on CPU) fc1, fc2 and the input gradients' products are oneDNN calls
    (:mod:`.onednn`), the weight gradients ``mm``; oneDNN writes each product into a tensor of its
    own, so the hidden tensor is then kept as one tensor per chunk instead of one (M, 4C) tensor."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, chunk, dnn):
        if dnn:
            hidden, outs = [], []
            for s in range(0, x.shape[0], chunk):
                hidden.append(onednn.mm_t(x[s:s + chunk], w1, b1))
                outs.append(onednn.mm_t(F.gelu(hidden[-1]), w2, b2))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        elif chunk >= x.shape[0]:
            hidden = [F.linear(x, w1, b1)]  # (M, 4C): the one hidden tensor kept for backward
            out = F.linear(F.gelu(hidden[0]), w2, b2)
        else:  # fc1, GELU and fc2 chunk by chunk, each product written straight into its rows
            hidden = [x.new_empty(x.shape[0], w1.shape[0])]
            out = x.new_empty(x.shape[0], w2.shape[0])
            for s in range(0, x.shape[0], chunk):
                hs, o = hidden[0][s:s + chunk], out[s:s + chunk]
                _linear_into(hs, x[s:s + chunk], w1, b1)
                _linear_into(o, F.gelu(hs), w2, b2)
        ctx.save_for_backward(x, w1, w2, *hidden)
        ctx.chunk, ctx.dnn, ctx.has_b1, ctx.has_b2 = chunk, dnn, b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        refuse_unsupported_backward(grad)
        x, w1, w2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dw1 = dw2 = db1 = db2 = None
        for i, s in enumerate(range(0, x.shape[0], ctx.chunk)):
            g, xs = grad[s:s + ctx.chunk], x[s:s + ctx.chunk]
            hs = hidden[i] if ctx.dnn else hidden[0][s:s + ctx.chunk]
            dh = onednn.mm_t(g, w2.t()) if ctx.dnn else g @ w2  # (chunk, 4C): the gradient at GELU's output
            if cpu_kernels.gelu_grad_eligible(hs, dh):  # GELU and its gradient in one pass (fp32 or bf16 CPU)
                a = cpu_kernels.gelu_and_grad_(hs, dh)  # dh: now the gradient at GELU's input
            else:
                a, dh = F.gelu(hs) if need_w2 else None, torch.ops.aten.gelu_backward(dh, hs)
            if need_w2:  # (C, 4C), summed over chunks
                dw2 = g.t() @ a if dw2 is None else dw2.addmm_(g.t(), a)
            if need_b2:
                db2 = g.sum(0) if db2 is None else db2.add_(g.sum(0))
            if need_w1:
                dw1 = dh.t() @ xs if dw1 is None else dw1.addmm_(dh.t(), xs)
            if need_b1:
                db1 = dh.sum(0) if db1 is None else db1.add_(dh.sum(0))
            if need_x and ctx.dnn:
                dx[s:s + ctx.chunk] = onednn.mm_t(dh, w1.t())
            elif need_x:
                torch.mm(dh, w1, out=dx[s:s + ctx.chunk])
        return dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, None, None


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)


def gelu_epilogue_eligible(mlp, x: torch.Tensor) -> bool:
    """Backend "fused", inference on CUDA (or the Triton interpreter) with 16-bit products: fc1 and
    GELU run as one Triton product (:mod:`.triton_linear`), fc2 as usual (the blocks whose MLP half
    is not one kernel already: C > 128). Nothing to differentiate, no active dropout, plain
    fc1/fc2/GELU and no hooks. Opt-in: on an H200 it was not yet faster than cuBLAS + inductor's GELU."""
    from . import _INTERPRET, transforming, triton_available

    if mlp.backend != "fused" or transforming() or not (x.is_cuda or _INTERPRET) or torch.is_grad_enabled():
        return False
    if dropout_active(mlp.drop1, mlp.drop2):
        return False
    dtype = autocast_dtype(x.device.type) or x.dtype
    fc1 = mlp.fc1
    return (dtype in (torch.float16, torch.bfloat16) and x.dtype in (torch.float32, dtype)
            and fc1.in_features % 16 == 0 and fc1.out_features % 16 == 0 and plain_mlp(mlp)
            and not has_hooks(mlp) and triton_available())


def mlp_gelu_epilogue(mlp, x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C): ``mlp.fc2(GELU(mlp.fc1(x)))`` with fc1's GELU in the product's epilogue."""
    from . import param_as
    from .triton_linear import linear_gelu

    dtype = autocast_dtype(x.device.type) or x.dtype
    fc1 = mlp.fc1
    bias = None if fc1.bias is None else param_as(fc1, "bias", dtype)  # as autocast rounds it for F.linear
    return mlp.fc2(linear_gelu(x.to(dtype), param_as(fc1, "weight", dtype), bias))


# -- fc1 + GELU as one cuBLASLt call (16-bit inference) ------------------------------------------------
# cuBLASLt applies GELU in the product's epilogue (``torch._addmm_activation``), so the (tokens x 4C)
# hidden layer is written once, already activated, instead of written by the product, read and written
# again by GELU. Its GELU is the tanh form; the model's is the erf form. The two differ by at most 4.7e-4
# (at x = -2.7, where GELU is -0.009), under a quarter of a bf16 unit in the last place for outputs over
# 0.25; a bf16 Swin-T's or SwinV2-T's logits are as far from the fp32 model's with either (tests/test_ops.py). On
# CPU the same call computes the erf form. Used on the device types in ``Mlp.LT_GELU_DEVICES``
# (("cuda",) by default since stop 25: on an H200 a compiled bf16 Swin-T ran 1.18x faster with it).

def lt_gelu_eligible(mlp, x: torch.Tensor) -> bool:
    """Inference with 16-bit products on a device type in ``mlp.LT_GELU_DEVICES``: nothing to
    differentiate, no active dropout, a fast backend, plain fc1/fc2/GELU with biases and no hooks."""
    if x.device.type not in mlp.LT_GELU_DEVICES or torch.is_grad_enabled() or not fast(mlp.backend):
        return False
    if dropout_active(mlp.drop1, mlp.drop2):
        return False
    dtype = autocast_dtype(x.device.type) or x.dtype
    return (dtype in (torch.float16, torch.bfloat16) and x.dtype in (torch.float32, dtype)
            and mlp.fc1.bias is not None and plain_mlp(mlp) and not has_hooks(mlp))


def mlp_lt_gelu(mlp, x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C): ``mlp.fc2(GELU(mlp.fc1(x)))`` with fc1's GELU (tanh form on CUDA) in
    cuBLASLt's epilogue."""
    from . import param_as

    dtype = autocast_dtype(x.device.type) or x.dtype
    fc1 = mlp.fc1
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    h = addmm_gelu(x2, param_as(fc1, "weight", dtype), param_as(fc1, "bias", dtype))
    return mlp.fc2(h.view(*x.shape[:-1], h.shape[-1]))


@torch.library.custom_op("swin::addmm_gelu", mutates_args=())
def addmm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, K) x, (N, K) weight, (N,) bias -> GELU(x W^T + b), (M, N): one cuBLASLt call on CUDA (GELU's
    tanh form), addmm + the erf GELU on CPU. An operator of its own so that torch.compile keeps the
    call whole (inductor would split ``_addmm_activation`` into a product and a GELU pass)."""
    return torch._addmm_activation(bias, x.contiguous(), weight.t(), use_gelu=True)


@addmm_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])
