"""Window attention through ``F.scaled_dot_product_attention`` with the window glue cut to two gathers.

The reference path copies the map five times (pad, roll, partition, reverse, roll back). Here the
pad+shift+partition is one ``index_select`` of token rows and the reverse+unshift+crop is another:
the index tensors depend only on (map size, window, shift) and are cached. The relative position
bias and the shift mask are summed once into one additive (nW, heads, N, N) tensor per
(map size, window, shift) that SDPA broadcasts over the batch; in eval (no grad) it is cached per
module (swin.ops.cached) and rebuilt only when the bias parameters change.

Two layouts, chosen by device:
- CPU: q/k/v are strided views of the qkv projection (no copy); SDPA runs once per image with the
  (nW, heads, N, N) bias as its attention mask (windows are SDPA's batch). CPU SDPA reads strided
  inputs and writes (nW, N, heads, d) memory, so the output needs no permute either.
- CUDA: q/k/v are copied once to (B, nW*heads, N, d) and SDPA runs once with a (1, nW*heads, N, N)
  mask, broadcast over B by stride (never expanded per image).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import windows as W
from . import cpu_kernels, exporting, refuse_unsupported_backward


def _build_indices(height: int, width: int, window: int, shift: int, device: torch.device):
    """Gather indices for a (height, width) map padded to (Hp, Wp) and shifted by -shift.

    fwd: (Hp*Wp,) position in the padded map of each token in window-partition order.
    rev: (height*width,) partition-order slot of each original token (reverse, unshift and crop).
    """
    Hp, Wp = W.padded_size(height, width, window)
    ys = (torch.arange(Hp, device=device) + shift) % Hp
    xs = (torch.arange(Wp, device=device) + shift) % Wp
    pos = (ys[:, None] * Wp + xs[None, :]).view(1, Hp, Wp, 1)  # shifted map of padded positions
    fwd = W.window_partition(pos, window).reshape(-1)  # (Hp*Wp,)
    inv = torch.empty_like(fwd)
    inv[fwd] = torch.arange(fwd.numel(), device=device)
    rev = inv.view(Hp, Wp)[:height, :width].reshape(-1)  # (H*W,)
    return fwd, rev


@W.kept(128)
def _cached_indices(height, width, window, shift, device):
    return _build_indices(height, width, window, shift, device)


def window_indices(height: int, width: int, window: int, shift: int, device: torch.device):
    """Cached (fwd, rev) gather indices; see :func:`_build_indices`."""
    if W.recording():
        return _build_indices(height, width, window, shift, device)
    return _cached_indices(height, width, window, shift, torch.device(device))


def bias_and_mask(attn, height: int, width: int, window: int, shift: int, mask_padding: bool,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(nW', heads, N, N) additive attention bias = relative position bias + shift mask, where nW'
    is the number of windows if a mask is needed and 1 otherwise. Cached when no grad is needed."""
    params = bias_params(attn)
    build = lambda: _build_bias_and_mask(attn, height, width, window, shift, mask_padding, dtype, device)  # noqa: E731
    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or W.recording():
        return build()
    from . import cached

    return cached(attn, ("sdpa", height, width, window, shift, mask_padding, dtype, device), params, build)


def bias_params(attn) -> tuple:
    """The parameters the relative position bias is computed from."""
    return (attn.relative_position_bias_table,) if attn.version == 1 else tuple(attn.cpb_mlp.parameters())


def _build_bias_and_mask(attn, height, width, window, shift, mask_padding, dtype, device):
    bias = attn.position_bias(window)  # (heads, N, N)
    mask = W.shift_mask(height, width, window, shift, mask_padding, device)  # (nW, N, N) or None
    if mask is None:
        return bias.unsqueeze(0).to(dtype).contiguous()  # (1, heads, N, N)
    # contiguous: SDPA would otherwise copy a permuted-layout mask on every call
    return (bias.unsqueeze(0) + mask.unsqueeze(1)).to(dtype).contiguous()  # (nW, heads, N, N)


FUSED_NORMALIZE = True  # inference: V2 q and k normalised together (False: F.normalize each; tests compare)


def split_qkv(attn, qkv: torch.Tensor):
    """(..., 3, heads, d) qkv projection -> strided views q, k, v of shape (..., heads, d) and the
    scale SDPA applies. V2 (cosine attention): q and k unit-normalised, q times exp(logit_scale)."""
    q, k, v = qkv.unbind(-3)
    if attn.version == 1:
        return q, k, v, attn.scale
    logit = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp().view(attn.num_heads, 1)  # (heads, 1)
    wide = torch.promote_types(v.dtype, torch.float32)  # fp32, or fp64 for a float64 model (as the reference)
    if FUSED_NORMALIZE and not torch.is_grad_enabled() and not torch.jit.is_tracing():  # (a trace: one path)
        # inference: q and k normalised together, exp(logit_scale) folded into q's (heads,) factors:
        # one norm and one multiply over both instead of a norm, a divide (and q's multiply) each
        qk = qkv[..., :2, :, :].to(wide)  # (..., 2, heads, d), a view
        r = torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        r[..., 0, :, :] *= logit.to(wide)
        qk = (qk * r).to(v.dtype)
        return qk[..., 0, :, :], qk[..., 1, :, :], v, 1.0
    # normalise and scale in fp32: in bf16 the product's rounding and a bf16 sum left logit_scale's
    # gradient 5x further from fp32 than the reference path's own bf16 error (H200, stop 9)
    if torch.is_grad_enabled() and not q.is_cuda and not exporting():
        # CPU training (not a graph being recorded: its out= division has no autograd formula there):
        # autograd's F.normalize backward on these strided views costs ~10% of a V2
        # step (unit_rows instead); q and k are written heads-major (the same (..., N, heads, d)
        # shape, transposed memory) so that the batched products read them without a copy
        q = unit_rows(q.to(wide).transpose(-3, -2), logit.to(wide).view(-1)).to(v.dtype)
        return q.transpose(-3, -2), unit_rows(k.to(wide).transpose(-3, -2)).to(v.dtype).transpose(-3, -2), v, 1.0
    q = (F.normalize(q.to(wide), dim=-1) * logit.to(wide)).to(v.dtype)  # SDPA wants one dtype
    return q, F.normalize(k.to(wide), dim=-1).to(v.dtype), v, 1.0


class _UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=-1) = x / max(||x||, 1e-12), with the backward in closed form:
    (g - y <g, y>) / n, y the output and n the clamped norm (g / n alone where n was clamped)."""

    @staticmethod
    def forward(ctx, x):
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
        y = torch.div(x, n, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))  # contiguous, whatever x's strides
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx, g):
        refuse_unsupported_backward(g)
        y, n = ctx.saved_tensors
        dot = (g * y).sum(-1, keepdim=True).masked_fill_(n <= 1e-12, 0.0)
        return torch.addcmul(g, y, dot, value=-1.0).div_(n)


class _UnitRowsKernel(torch.autograd.Function):
    """:class:`_UnitRows`, times ``scale[h]`` along dim -3 when given (q's exp(logit_scale) per head),
    as one pass of a C kernel each way (fp32 on an AVX-512 CPU, ``cpu_kernels.unit_rows``): the
    forward's norm, divide and multiply, and the backward's products, sums and addcmul were each a
    pass over the strided q and k views."""

    @staticmethod
    def forward(ctx, x, scale):
        y, n = cpu_kernels.unit_rows(x, scale)
        ctx.save_for_backward(y, n, scale)
        return y

    @staticmethod
    def backward(ctx, g):
        refuse_unsupported_backward(g)
        y, n, scale = ctx.saved_tensors
        dx, dscale = cpu_kernels.unit_rows_backward(g, y, n, scale)
        return dx, None if dscale is None else dscale.to(scale.dtype).view(scale.shape)


def unit_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.normalize(x, dim=-1), times ``scale`` ((heads,), indexing dim -3) when given."""
    if cpu_kernels.unit_rows_eligible(x) and (scale is None or (x.dim() >= 3 and scale.numel() == x.shape[-3])):
        return _UnitRowsKernel.apply(x, scale)
    y = _UnitRows.apply(x)
    return y if scale is None else y * scale.reshape(-1, 1, 1)


def window_attention_sdpa(attn, x: torch.Tensor, window: int, shift: int, mask_padding: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, C); the same function as ``attn``'s reference path."""
    B, H, Wd, C = x.shape
    heads, d = attn.num_heads, attn.head_dim
    Hp, Wp = W.padded_size(H, Wd, window)
    N, nW = window * window, (Hp // window) * (Wp // window)
    fwd, rev = window_indices(H, Wd, window, shift, x.device)

    x = W.pad_to_window(x, window)  # zeros, as the reference: padded tokens get qkv = qkv bias
    unpadded = fwd.numel() == rev.numel()  # then fwd and rev are permutations, each the other's inverse
    x = x.reshape(B, Hp * Wp, C)
    tokens = permute_tokens(x, fwd, rev) if unpadded else x.index_select(1, fwd)  # (B, nW*N, C) in window order
    qkv = attn.project_qkv(tokens)  # (B, nW*N, 3C)
    qkv = qkv.view(B, nW, N, 3, heads, d)
    q, k, v, scale = split_qkv(attn, qkv)  # each (B, nW, N, heads, d)
    p = attn.attn_drop.p if attn.attn_drop.training else 0.0
    # training the bias on CPU in fp32, or in bf16 (autocast) with windows the backward kernel takes:
    # the C kernels, which compute in fp32 and take the bias + mask in fp32
    kernel_train = (not x.is_cuda and p == 0.0 and torch.is_grad_enabled()
                    and (q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and N <= cpu_kernels.MAX_BACKWARD_TOKENS))
                    and any(t.requires_grad for t in bias_params(attn))
                    and not W.recording())
    mask = bias_and_mask(attn, H, Wd, window, shift, mask_padding, torch.float32 if kernel_train else q.dtype,
                         x.device)  # (nW or 1, heads, N, N)
    if kernel_train and cpu_kernels.eligible(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask):
        # the forward is one C kernel that also keeps the probabilities
        if attn.version == 1:  # q, k, v are views of qkv: its gradient comes out in one buffer
            out = _CpuKernelAttention.apply(None, None, None, mask, scale, qkv)  # (B, nW*N, C)
        else:  # V2's q and k are normalised copies
            out = _CpuKernelAttention.apply(q, k, v, mask, scale)
        return attn.proj_drop(attn.project_out(_unpermute(out, rev, fwd, unpadded, B, H, Wd)))
    mask = mask.to(q.dtype)  # the plain paths below take it in q's dtype
    if not x.is_cuda and (mask.requires_grad or exporting()):
        # training the bias on CPU: SDPA's CPU kernel has no gradient for the mask and would fall
        # back to its generic math path; plain batched matmuls with the (nW, heads, N, N) bias
        # broadcast over the batch are faster, and flushing the masked (~1e-44, subnormal)
        # probabilities to 0 makes the products with them ~70x faster (softmax_flush_tiny).
        # Exported graphs take this branch too: one graph for any batch (the per-image loop below
        # would fix the batch size)
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))  # (B, nW, heads, N, d) views
        qs = q if scale == 1.0 else q * scale  # V2's q already carries exp(logit_scale): no pass by 1.0
        logits = qs @ k.transpose(-2, -1) + mask  # (B, nW, heads, N, N)
        probs = F.dropout(softmax_flush_tiny(logits), p, training=p > 0)  # no subnormal probabilities
        out = (probs @ v).transpose(2, 3)  # (B, nW, N, heads, d)
    elif x.is_cuda:
        # one copy to (B, nW*heads, N, d) so that the per-window mask broadcasts over the batch
        q, k, v = (t.permute(0, 1, 3, 2, 4).reshape(B, nW * heads, N, d) for t in (q, k, v))
        m = mask.expand(nW, heads, N, N).reshape(1, nW * heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, scale=scale)
        out = out.view(B, nW, heads, N, d).transpose(2, 3)  # (B, nW, N, heads, d)
    elif mask.shape[0] == 1:
        # no shift mask: windows of all images form SDPA's batch, the bias broadcasts
        q, k, v = (t.reshape(B * nW, N, heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        out = out.transpose(1, 2)  # (B*nW, N, heads, d)
    else:
        # one SDPA per image: its windows are SDPA's batch, so the (nW, heads, N, N) mask matches
        outs = [F.scaled_dot_product_attention(q[b].transpose(1, 2), k[b].transpose(1, 2), v[b].transpose(1, 2),
                                               attn_mask=mask, dropout_p=p, scale=scale).transpose(1, 2)
                for b in range(B)]  # each (nW, N, heads, d)
        out = torch.stack(outs)
    return attn.proj_drop(attn.project_out(_unpermute(out.reshape(B, nW * N, C), rev, fwd, unpadded, B, H, Wd)))


def _unpermute(out, rev, fwd, unpadded: bool, B: int, H: int, Wd: int) -> torch.Tensor:
    """(B, nW*N, C) in window order -> (B, H, W, C): reverse the partition, unshift, crop."""
    out = permute_tokens(out, rev, fwd) if unpadded else out.index_select(1, rev)
    return out.view(B, H, Wd, out.shape[-1])


class _CpuKernelAttention(torch.autograd.Function):
    """softmax(scale q k^T + mask) v for (B, nW, N, heads, d) q/k/v views and a (nW or 1, heads, N, N)
    mask broadcast over the batch -> (B, nW*N, C) token rows. Forward: :mod:`.cpu_kernels` (no
    logits tensor, probabilities below e^-80 flushed to 0 as softmax_flush_tiny does below 1e-30);
    backward: from the saved probabilities, the kernel's backward for windows up to 64 tokens, else
    the same products and softmax gradient autograd would run on the plain path.

    Given ``qkv`` (V1: the (B, nW, N, 3, heads, d) projection) instead of q, k, v, it takes them as
    views of it and returns qkv's gradient written in one buffer in its layout, where three separate
    gradients would be stacked into one by autograd afterwards."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, qkv=None):
        ctx.packed = qkv is not None
        if ctx.packed:
            q, k, v = qkv.unbind(-3)
        B, nW, N, heads, d = q.shape
        out, probs = cpu_kernels.window_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask, scale,
                                                  probs=True)
        ctx.save_for_backward(*((qkv,) if ctx.packed else (q, k, v)), probs)
        ctx.scale, ctx.mask_windows = scale, mask.shape[0]
        return out.view(B, nW * N, heads * d)

    @staticmethod
    def backward(ctx, grad):
        refuse_unsupported_backward(grad)
        *inputs, probs = ctx.saved_tensors
        q, k, v = inputs[0].unbind(-3) if ctx.packed else inputs
        B, nW, N, heads, d = q.shape
        qf = q.flatten(0, 1)
        if cpu_kernels.backward_eligible(qf) and grad.dtype == q.dtype:  # the five products in one kernel
            g = grad.reshape(B * nW, N, heads, d)
            if g.stride(3) != 1:  # e.g. the expanded gradient of out.sum(): the kernel reads whole rows
                g = g.contiguous()
            dqkv = torch.empty(inputs[0].shape, dtype=q.dtype) if ctx.packed else None
            out = None if dqkv is None else tuple(t.flatten(0, 1) for t in dqkv.unbind(-3))
            dq, dk, dv, ds = cpu_kernels.window_attention_backward(
                qf, k.flatten(0, 1), v.flatten(0, 1), probs, g, ctx.scale, ctx.needs_input_grad[3], out)
            dmask = None
            if ds is not None:
                ds = ds.view(B, nW, heads, N, N)
                dmask = ds.sum(0) if ctx.mask_windows == nW else ds.sum((0, 1)).unsqueeze(0)
            if ctx.packed:
                return None, None, None, dmask, None, dqkv
            shape = (B, nW, N, heads, d)
            return dq.view(shape), dk.view(shape), dv.view(shape), dmask, None, None
        probs = probs.view(B, nW, heads, N, N)  # fp32 (for bf16 q/k/v too): the products below in fp32
        dtype = q.dtype
        g = grad.to(probs.dtype).view(B, nW, N, heads, d).transpose(2, 3)  # (B, nW, heads, N, d)
        q, k, v = (t.to(probs.dtype).transpose(2, 3) for t in (q, k, v))
        dv = probs.transpose(-2, -1) @ g
        dlogits = torch._softmax_backward_data(g @ v.transpose(-2, -1), probs, -1, probs.dtype)
        dq, dk = dlogits @ k, dlogits.transpose(-2, -1) @ q
        if ctx.scale != 1.0:  # V2's q carries its scale already
            dq.mul_(ctx.scale), dk.mul_(ctx.scale)
        dmask = dlogits.sum(0) if ctx.mask_windows == nW else dlogits.sum((0, 1)).unsqueeze(0)
        dq, dk, dv = (t.to(dtype).transpose(2, 3) for t in (dq, dk, dv))
        if ctx.packed:
            return None, None, None, dmask, None, torch.stack((dq, dk, dv), dim=-3)
        return dq, dk, dv, dmask, None, None


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, perm)`` for a permutation ``perm``: its gradient is the gather by the
    inverse permutation, where autograd's index_select backward scatter-adds into a zeroed tensor."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C): rows in the order ``perm``; ``inverse`` is its inverse permutation."""
    if x.requires_grad and torch.is_grad_enabled() and not W.recording():
        return _PermuteTokens.apply(x, perm, inverse)
    return x.index_select(1, perm)


# Probabilities below this are set to exactly 0 after the softmax. The official shift mask adds -100
# to masked logits, so their probabilities are ~1e-44: subnormal floats, which x86 cores process
# dozens of times slower than normal ones in every later product (P @ v and the backward's products
# with P). Values this small change no output by more than 1e-30 of its scale.
TINY = 1e-30


class _SoftmaxFlushTiny(torch.autograd.Function):
    """softmax over the last dim with probabilities < TINY set to 0, forward and backward."""

    @staticmethod
    def forward(ctx, logits):
        probs = F.threshold(torch.softmax(logits, -1), TINY, 0.0, inplace=True)
        ctx.save_for_backward(probs)
        ctx.input_dtype = logits.dtype  # autocast may give fp32 probabilities for bf16 logits
        return probs

    @staticmethod
    def backward(ctx, grad):
        refuse_unsupported_backward(grad)
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad.to(probs.dtype), probs, -1, ctx.input_dtype)


def softmax_flush_tiny(logits: torch.Tensor) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():  # a plain Softmax node: the flush would be two more nodes per
        return torch.softmax(logits, -1)  # block (7% of Swin-T's time in onnxruntime); see swin.export
    if torch.jit.is_tracing():  # standard operators, the same with autograd on or off (the trace's check
        # records both): a trace saves them, where it cannot save a Python autograd Function
        return F.threshold(torch.softmax(logits, -1), TINY, 0.0)
    if not (logits.requires_grad and torch.is_grad_enabled()):  # nothing to save for a backward
        return F.threshold(torch.softmax(logits, -1), TINY, 0.0, inplace=True)
    return _SoftmaxFlushTiny.apply(logits)
