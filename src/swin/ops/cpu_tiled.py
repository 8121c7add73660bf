"""CPU inference: run a stage's blocks a chunk of whole windows at a time, in cache and in place.

Why. On CPU, eager Swin inference spends a quarter of its time outside the matrix products, and
most of that on tensors far larger than the caches: each block allocates several (tokens x 3C)
and (tokens x 4C) buffers (glibc maps those fresh from the kernel on every call, so each page is
faulted in again), then LayerNorm, bias, GELU and the residual adds stream through them one at a
time. Windows are independent and everything but attention is per token, so a whole block can run
on ~2k tokens of whole windows at a time, all of which stay in the L2 cache:

    rows = the chunk's tokens, gathered in window order (pad + cyclic shift + partition = a row index)
    V1: rows += proj(attn(LN1(rows)));  rows += fc2(GELU(fc1(LN2(rows))))
    V2: rows += LN1(proj(attn(rows)));  rows += LN2(fc2(GELU(fc1(rows))))
    scatter rows back to the same positions of the stage's one token buffer

Blocks write back to the rows they read, so a stage runs in place on one buffer (no per-block
allocation). The arithmetic per token is the reference's (same operations, same order, the
residual add folded into the projection's accumulate), so the logits match the reference to
float rounding (tests/test_ops.py). In fp32 on AVX-512 the passes around the products are C
kernels (``cpu_kernels``): the gather with norm1 and proj's bias, norm2 with fc2's bias, V2's
``rows += norm(y)`` and the scatter are one pass each, and so are patch merging's gather and norm
(:func:`patch_merging`).

Used only where it is the same function as the reference and faster: CPU, nothing to differentiate
(no_grad / inference_mode, or a frozen model and an input without grad), eval mode, not under
torch.export or torch.jit.trace, backend "auto" or "sdpa" (or "triton"/"fused", whose kernels
need CUDA), no forward hooks (nor, while autograd records, backward hooks) on the blocks or
anything in them (they would not fire), and every LayerNorm/Linear/GELU the plain module (a LoRA
wrapper or a quantized layer in their place is called as itself on the per-block path) (:func:`eligible`).

Inside torch.compile a stage is one custom op (``swin::cpu_stage``) that the compiled graph calls and
does not trace: traced, the chunk loop compiled for minutes and ran 0.94x this eager path (stop 7),
and the per-block path compiled instead ran 0.81-0.93x; as one op, a compiled model runs as fast as
eager and inductor compiles what lies between the stages. torch.export takes the per-block path instead, so that an exported program holds only
standard operators.

Under CPU autocast (bf16) the blocks' input is already autocast's dtype (the patch embedding's
convolution made it so) and LayerNorm keeps it: the residual stream is bf16 and every product runs
in bf16, as on the per-block path. Here the products take bf16 copies of the weights, made once and
kept until the weights change, instead of autocast casting each weight on every call; attention and
the row passes are the C kernels' bf16 forms (fp32 inside, each result rounded once to bf16; the
attention's bias + mask built in fp32 for it).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .. import windows as W
from . import (_INTERPRET, autocast_dtype, block_dropout_active, cached, cpu_kernels, exporting, fast, has_hooks,
               param_as, transforming)
from .mlp import plain_mlp
from .onednn import available as _onednn_ok
from .sdpa import bias_and_mask, split_qkv, window_indices

CHUNK_TOKENS = 2048  # tokens per chunk: fc1's (tokens x 4C) output then fits the L2 cache for C <= 96


def eligible(layer, x: torch.Tensor) -> bool:
    """True when :func:`run_blocks` computes exactly what ``layer``'s blocks compute, faster."""
    if x.device.type != "cpu" or layer.training or block_dropout_active(layer.blocks) or transforming():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.blocks.parameters())):
        return False  # autograd would need what the per-block path saves (a frozen model needs nothing)
    if exporting():
        return False
    dtype = autocast_dtype("cpu")
    if dtype is not None and (x.dtype != dtype or torch.compiler.is_compiling()):
        return False  # under autocast: a stage whose input autocast has made its dtype, eagerly
    return (all(_cpu_backend(blk.attn.backend) and _plain_block(blk) for blk in layer.blocks)
            and not has_hooks(layer.blocks))


def _cpu_backend(name: str) -> bool:
    """Backends this path serves: "auto", "sdpa", and on a CPU "triton"/"fused" too (their kernels
    need CUDA, and would otherwise leave a CPU model on the slower per-block SDPA path); under the
    Triton interpreter those two keep their kernels, which is how they are tested."""
    return name in ("auto", "sdpa") or (name in ("triton", "fused") and not _INTERPRET)


def _plain_block(blk) -> bool:
    """Every layer this path reads weights from is exactly the PyTorch module (see swin.ops.is_plain;
    hooks are checked for all blocks at once by :func:`eligible`)."""
    return (type(blk.norm1) is torch.nn.LayerNorm and type(blk.norm2) is torch.nn.LayerNorm
            and type(blk.attn.qkv) is torch.nn.Linear and type(blk.attn.proj) is torch.nn.Linear
            and plain_mlp(blk.mlp)
            and all(m.bias is not None for m in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)))  # as nn.Linear builds them


def chunk_windows(num_windows: int, tokens_per_window: int) -> int:
    """Windows per chunk: a divisor of the image's window count (chunks stay inside one image) or a
    multiple of it (chunks hold whole images), so each chunk's shift mask is a slice."""
    want = max(1, CHUNK_TOKENS // tokens_per_window)
    if want >= num_windows:
        return (want // num_windows) * num_windows
    return max(d for d in range(1, want + 1) if num_windows % d == 0)


def run_blocks(blocks, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, C): ``blocks`` (one stage's) applied in order, inference only. With
    ``consume`` (the caller's ``x`` is its own intermediate, held nowhere else) the blocks run in place
    on ``x`` when it is contiguous and needs no padding; otherwise on a copy. Inside torch.compile
    the stage is an op that must not mutate its input, so there it always copies."""
    if torch.compiler.is_compiling():
        return torch.ops.swin.cpu_stage(x, _stage_key(blocks))
    return _run_blocks(blocks, x, consume)


# -- inside torch.compile: a stage as one op the graph calls -----------------------------------------
_STAGES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def _stage_key(blocks) -> int:
    """A key for ``blocks`` that the compiled graph holds as a constant, registered while tracing."""
    _STAGES[id(blocks)] = blocks
    return id(blocks)


# what @torch.compiler.assume_constant_result does, by hand: the decorator imports torch._dynamo, which
# made `import swin` (and every `swin` command) ~1.8 s slower; a test checks the two mark alike
_stage_key._dynamo_marked_constant = True


@torch.library.custom_op("swin::cpu_stage", mutates_args=(), device_types="cpu")
def _stage_op(x: torch.Tensor, key: int) -> torch.Tensor:
    """:func:`run_blocks` on the stage registered under ``key``; reads its current weights."""
    return _run_blocks(_STAGES[key], x)


@_stage_op.register_fake
def _(x, key):
    return x.new_empty(x.shape)


def _run_blocks(blocks, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
    B, H, Wd, C = x.shape
    window = W.window_and_shift(H, Wd, blocks[0].window_size, 0)[0]
    Hp, Wp = W.padded_size(H, Wd, window)
    padded = (Hp, Wp) != (H, Wd)
    # the stage's token buffer, padded map, flattened; padded rows stay zero throughout. A fresh
    # copy unless the caller gave x away: the copies (13 MB for Swin-B b8's stage 1) cost Swin-T 1.8%
    # and Swin-B up to 1.7% of a forward, in fresh memory more than in the copying itself (0.5%)
    tokens = W.pad_to_window(x, window).reshape(B * Hp * Wp, C)
    if tokens.data_ptr() == x.data_ptr() and not consume:
        tokens = tokens.clone(memory_format=torch.contiguous_format)
    tokens = tokens.contiguous()
    with torch.autocast("cpu", enabled=False):  # everything below in the tokens' dtype, weights cast once
        for blk in blocks:
            _run_block(blk, tokens, B, H, Wd, Hp, Wp, padded)
    out = tokens.view(B, Hp, Wp, C)
    return out[:, :H, :Wd].contiguous() if padded else out


def _run_block(blk, tokens: torch.Tensor, B: int, H: int, Wd: int, Hp: int, Wp: int, padded: bool) -> None:
    attn = blk.attn
    C, heads, d = tokens.shape[1], attn.num_heads, attn.head_dim
    window, shift = W.window_and_shift(H, Wd, blk.window_size, blk.shift_size)
    N, nW = window * window, (Hp // window) * (Wp // window)
    fwd, _ = window_indices(H, Wd, window, shift, tokens.device)  # window-order slot -> padded-map position
    rows = (torch.arange(B, device=tokens.device).view(B, 1) * (Hp * Wp) + fwd.view(1, -1)).reshape(-1)
    real = None
    if padded:  # (nW*N, 1): 1 for a real token, 0 for padding, in window order
        real = torch.zeros(Hp, Wp, dtype=tokens.dtype, device=tokens.device)
        real[:H, :Wd] = 1
        real = real.view(-1)[fwd].view(-1, 1)
    # the bias + mask in the attention's dtype; fp32 where the C kernel runs it (it computes in fp32, bf16 too)
    mask = bias_and_mask(attn, H, Wd, window, shift, blk.mask_padding, cpu_kernels.mask_dtype(tokens.dtype, N, d),
                         tokens.device)
    k = chunk_windows(nW, N)
    if mask.shape[0] > 1 and k > nW:  # chunks of whole images: the mask repeated per image, kept
        mask_k = cached(attn, ("mask_k", H, Wd, window, shift, blk.mask_padding, k, mask.dtype), (mask,),
                        lambda: mask.repeat(k // nW, 1, 1, 1))

    dtype = tokens.dtype
    cosine = None  # V2: (heads,) exp(logit_scale), where the kernel normalises q and k itself
    if attn.version == 2 and cpu_kernels.cosine_eligible(dtype, d):
        cosine = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp().reshape(heads).float()
    qkv_b = attn.qkv_bias()
    qkv_b = None if qkv_b is None else qkv_b.to(dtype)
    qkv_packed = _packed_weight(attn.qkv, tokens) if USE_ONEDNN else None
    qkv_w = param_as(attn.qkv, "weight", dtype).t() if qkv_packed is None else None
    # V1 adds proj's and fc2's biases in the row passes, in fp32 (so the bf16 row kernels take them
    # as they are); V2 adds them inside the products, in the products' dtype
    bias_dtype = dtype if blk.post_norm else torch.float32
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    proj_p = _packed_weight(attn.proj, tokens) if USE_ONEDNN else None
    fc2_p = _packed_weight(fc2, tokens) if USE_ONEDNN else None
    # addmm's (K, N) weights only where no packed one runs (no bf16 copy made and kept for nothing)
    proj_w = param_as(attn.proj, "weight", dtype).t() if proj_p is None else None
    fc2_w = param_as(fc2, "weight", dtype).t() if fc2_p is None else None
    proj_b, fc2_b = param_as(attn.proj, "bias", bias_dtype), param_as(fc2, "bias", bias_dtype)
    n1, n2 = blk.norm1, blk.norm2

    def attention(h: torch.Tensor, w0: int, kk: int) -> torch.Tensor:
        """(kk*N, C) normed tokens of windows w0..w0+kk -> (kk*N, C) attention output before proj."""
        qkv = linear(h, qkv_w, qkv_b, qkv_packed)  # oneDNN adds the bias inside the product
        if mask.shape[0] == 1:
            m = mask
        elif k > nW:
            m = mask_k[:kk]
        else:
            m = mask[w0 % nW:w0 % nW + kk]
        if cosine is not None:  # V2: q and k normalised inside the kernel
            q, k_, v = qkv.view(kk, N, 3, heads, d).unbind(2)
            if cpu_kernels.eligible(q, k_, v, m):
                return cpu_kernels.window_attention(q, k_, v, m, 1.0, cosine=cosine)
        q, k_, v, scale = split_qkv(attn, qkv.view(kk, N, 3, heads, d))  # (kk, N, heads, d) views
        if cpu_kernels.eligible(q, k_, v, m):  # fp32 or bf16 on AVX-512: one kernel writes the token rows
            return cpu_kernels.window_attention(q, k_, v, m, scale)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=m.to(q.dtype), scale=scale)  # (kk, heads, N, d)
        return o.transpose(1, 2).reshape(kk * N, C)

    total = B * nW
    xc_buf = tokens.new_empty(min(k, total) * N, C)  # a chunk's rows (and V1's norm of them): reused by every chunk
    h_buf = None if blk.post_norm else torch.empty_like(xc_buf)
    for w0 in range(0, total, k):
        kk = min(k, total - w0)
        idx = rows[w0 * N:(w0 + kk) * N]
        xc = xc_buf[:kk * N]  # (kk*N, C), in cache from here on
        keep = None
        if real is not None:  # this chunk's rows of `real`: a slice of one image's, or whole images'
            keep = real[(w0 % nW) * N:(w0 % nW + kk) * N] if k <= nW else real.repeat(kk // nW, 1)
        if not blk.post_norm:  # V1: pre-norm. xc = the rows + proj's bias, h = norm1(rows), one pass
            h = cpu_kernels.norm_rows(tokens, n1, h_buf[:kk * N], index=idx, copy=xc, copy_bias=proj_b)
            if keep is not None:
                h.mul_(keep)  # the reference pads after norm1: padded tokens enter attention as zeros
            xc = residual_linear(xc, attention(h, w0, kk), proj_w, proj_p)
            h = cpu_kernels.norm_rows(xc, n2, h, copy=xc, copy_bias=fc2_b)  # h = norm2(xc), then xc += fc2's bias
            xc = residual_linear(xc, fc1_gelu(fc1, h), fc2_w, fc2_p)
        else:  # V2: res-post-norm, xc += norm(branch)
            cpu_kernels.norm_rows(tokens, None, index=idx, copy=xc)
            a = linear(attention(xc, w0, kk), proj_w, proj_b, proj_p)
            cpu_kernels.norm_rows(a, n1, xc, accumulate=True)
            y = linear(fc1_gelu(fc1, xc), fc2_w, fc2_b, fc2_p)
            cpu_kernels.norm_rows(y, n2, xc, accumulate=True)
        if keep is not None:
            xc.mul_(keep)  # padded rows go back as zeros (V2 feeds the raw map to attention)
        cpu_kernels.scatter_rows(tokens, idx, xc)


# -- patch merging -------------------------------------------------------------------------------
def merge_eligible(merging, x: torch.Tensor) -> bool:
    """True when :func:`patch_merging` computes what ``merging`` (a PatchMerging) computes: a fast
    backend, fp32 CPU inference (nothing to differentiate), outside torch.compile / export / tracing and
    torch.func transforms, the plain LayerNorm and Linear without hooks, and the C kernels built."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or autocast_dtype("cpu") is not None:
        return False
    if not fast(getattr(merging, "backend", "auto")):  # (a model pickled before PatchMerging had one)
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in merging.parameters())):
        return False
    if W.recording():
        return False
    return (type(merging.norm) is torch.nn.LayerNorm and type(merging.reduction) is torch.nn.Linear
            and not has_hooks(merging) and cpu_kernels.available())


def patch_merging(merging, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 2C): ``merging(x)`` with the 2 x 2 gather (and V1's norm) as one
    pass of the C kernel instead of a permuted copy and a LayerNorm over (tokens/4, 4C) tensors."""
    B, H, Wd, _ = x.shape
    red = merging.reduction
    rows = cpu_kernels.merge_rows(x.contiguous(), None if merging.post_norm else merging.norm)
    packed = _packed_weight(red, rows) if USE_ONEDNN else None
    y = linear(rows, red.weight.t(), red.bias, packed)
    if merging.post_norm:  # V1: norm, then the reduction; V2: the reduction, then the norm (in place)
        y = cpu_kernels.norm_rows(y, merging.norm, y)
    return y.view(B, (H + 1) // 2, (Wd + 1) // 2, y.shape[1])


# -- the products as oneDNN calls ---------------------------------------------------------------
# Every product here (qkv, proj, fc1 + GELU, fc2, patch merging's reduction) is one oneDNN call on a
# weight prepacked once, with the bias, GELU or the residual add as a post-op. PyTorch's addmm runs
# MKL's sgemm instead, which on an AMD Zen 4 CPU reaches 0.80-0.87x oneDNN's rate at Swin's shapes
# (2-core EPYC VM: 173-191 against 217-219 GFLOP/s at Swin-B's stage 3); on Intel Xeon the two were
# within 0.5% of each other in the model (stop 18). See also ``onednn.py`` (training).
USE_ONEDNN = True  # set False to always take the plain addmm (+ GELU) instead


def fc1_gelu(fc1, h: torch.Tensor) -> torch.Tensor:
    """GELU(fc1(h)) for (tokens, C) ``h``. Where PyTorch's oneDNN build is present, one call with
    the bias and the exact (erf) GELU fused into the matrix product on a weight prepacked once
    (what inductor's freezing pass uses); otherwise addmm then GELU. Same values either way."""
    packed = _packed_weight(fc1, h) if USE_ONEDNN and fc1.bias is not None else None
    if packed is None:
        return F.gelu(torch.addmm(param_as(fc1, "bias", h.dtype), h, param_as(fc1, "weight", h.dtype).t()))
    return torch.ops.mkldnn._linear_pointwise(h, packed, fc1.bias.contiguous(), "gelu", [], "none")


def residual_linear(acc, h, w_t, packed):
    """acc + h @ w_t: in place with addmm_, or oneDNN's product with the sum as a post-op."""
    if packed is None:
        return acc.addmm_(h, w_t)
    return torch.ops.mkldnn._linear_pointwise.binary(h, acc, packed, None, "add")


def linear(h, w_t, b, packed):
    """h @ w_t + b: addmm, or oneDNN's product on the prepacked weight."""
    if packed is None:
        return h @ w_t if b is None else torch.addmm(b, h, w_t)
    return torch.ops.mkldnn._linear_pointwise(h, packed, None if b is None else b.contiguous(), "none", [], "none")


def _packed_weight(linear, h: torch.Tensor):
    """``linear``'s weight in ``h``'s dtype in oneDNN's blocked layout, cached until the weight
    changes; None where not applicable (no oneDNN, or the op failed here once)."""
    w = linear.weight
    if not _onednn_ok(h.dtype):
        return None

    def build():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(h.dtype), CHUNK_TOKENS)
            bias = torch.zeros(w.shape[0], dtype=h.dtype)
            probe = h.new_zeros(1, w.shape[1])
            for post_op in ("none", "gelu"):  # both run here?
                torch.ops.mkldnn._linear_pointwise(probe, packed, bias, post_op, [], "none")
            torch.ops.mkldnn._linear_pointwise.binary(probe, h.new_zeros(1, w.shape[0]), packed, None, "add")
            return packed
        except (RuntimeError, NotImplementedError):
            return None

    return cached(linear, ("onednn", tuple(w.shape), h.dtype), (w,), build)
