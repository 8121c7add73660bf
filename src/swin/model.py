"""Swin Transformer V1 and V2, top-down: model -> stage -> block -> window attention -> patch embed/merge.

Feature maps stay channels-last, (B, H, W, C), between blocks. Parameter names are the official
ones (microsoft/Swin-Transformer), so official checkpoints load as they are; every other key
scheme lives in :mod:`swin.convert`.

Any input size works without rebuilding the model: the stem pads to the patch size, each block
pads its map at the right/bottom to a window multiple *before* the cyclic shift (the shift mask
is built on the padded map), and patch merging pads odd maps. A map not larger than the window is
one window of its size with no shift (the official rule).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import windows as W
from .config import SwinConfig
from .ops import (autocast_dtype, cpu_tiled, fast, fused_attention_half, fused_block_eligible, fused_mlp_half,
                  drop_caches, has_hooks, is_plain, transforming)
from .ops import mlp as mlp_ops
from .ops import onednn


class SwinTransformer(nn.Module):
    """Swin (``config.version == 1``) or SwinV2 (``== 2``) image classifier and backbone."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config = config.validate()
        self.num_classes = config.num_classes
        self.num_features = config.num_features
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim, config.backend)
        self.pos_drop = nn.Dropout(config.drop_rate)
        n_blocks = sum(config.depths)
        dpr = [config.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear decay rule
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.layers.append(BasicLayer(
                config, dim=config.embed_dim * 2**i, depth=depth, num_heads=config.num_heads[i],
                pretrained_window=config.pretrained_window_sizes[i], drop_path=dpr[start:start + depth],
                downsample=i < config.num_layers - 1))
        self.norm = nn.LayerNorm(self.num_features)
        # detection/segmentation backbones norm each stage's output map (the last stage's by ``norm``)
        self.out_norms = nn.ModuleList(nn.LayerNorm(config.embed_dim * 2**i) for i in range(config.num_layers - 1)
                                       ) if config.out_norms else None
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for layer in self.layers:
            for blk in layer.blocks:
                blk.attn.reset_special_parameters()
        # load_state_dict(assign=True) puts in new tensors: the fast paths' weight caches start afresh
        self.register_load_state_dict_post_hook(_weights_loaded)

    def _apply(self, fn, *args, **kwargs):
        # .float() / .half() / .to(device) make new weight tensors; one may reuse a freed one's address
        # at version 0, which the caches' keys (address, version, dtype) cannot tell apart. A .to() that
        # changes nothing (called every step in some loops) keeps the caches.
        before = [(p.data_ptr(), p.dtype, p.device) for p in self.parameters()]
        out = super()._apply(fn, *args, **kwargs)
        if before != [(p.data_ptr(), p.dtype, p.device) for p in self.parameters()]:
            drop_caches(self)
        return out

    # -- public API ------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def set_backend(self, backend: str) -> None:
        """Choose the window-attention implementation: "auto", "reference", "sdpa", "triton" or "fused"."""
        from .ops import check_backend

        check_backend(backend)
        self.patch_embed.backend = backend
        for layer in self.layers:
            if layer.downsample is not None:
                layer.downsample.backend = backend
            for blk in layer.blocks:
                blk.attn.backend = blk.mlp.backend = backend

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> pooled features (B, num_features)."""
        x = self._stem(x)
        owned = self._owns_stage_inputs(x)
        for layer in self.layers:
            x = layer(x, self.grad_checkpointing, consume_input=owned)
        x = self.norm(x)  # (B, h, w, 8C)
        return x.mean(dim=(1, 2))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) pooled features -> logits (B, num_classes); the identity without a head."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None,
                              norm: bool | None = None) -> list[torch.Tensor]:
        """NCHW feature maps of the chosen stages (strides P, 2P, 4P, 8P for patch size P: 4, 8, 16, 32 for
        the ImageNet models; widths C, 2C, 4C, 8C).

        Each is the output of a stage before the following patch merging. ``norm=True`` applies the final
        LayerNorm to the last stage's map (as the classifier sees it) and, in a model with ``out_norms``
        (a detection/segmentation backbone), each earlier stage's own norm to its map: the official
        detection code's and mmdet's backbone outputs. Default: True exactly when the model has ``out_norms``.
        """
        n = self.config.num_layers
        norm = self.out_norms is not None if norm is None else norm
        indices = range(n) if indices is None else [indices] if isinstance(indices, int) else list(indices)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ValueError(f"indices must be stage numbers (integers in 0..{n - 1}, or negative from the end), "
                             f"got {indices!r}.")
        wanted = sorted({i % n if -n <= i < n else _bad_index(i, n) for i in indices})
        if not wanted:
            return []
        x = self._stem(x)
        owned = self._owns_stage_inputs(x)
        out = []
        for i, layer in enumerate(self.layers):
            x, before_merge = layer(x, self.grad_checkpointing, return_before_merge=True, consume_input=owned)
            if i in wanted:
                if norm and i == n - 1:
                    before_merge = self.norm(before_merge)
                elif norm and self.out_norms is not None:
                    before_merge = self.out_norms[i](before_merge)
                out.append(before_merge.permute(0, 3, 1, 2).contiguous())  # (B, C, h, w)
            if i >= wanted[-1]:
                break
        return out

    @property
    def feature_info(self) -> list[dict]:
        """What :meth:`forward_intermediates` returns per stage, as timm describes its feature maps (for FPN
        necks): ``num_chs`` (channels), ``reduction`` (stride in pixels) and ``module`` (the stage)."""
        c = self.config
        return [{"num_chs": c.embed_dim * 2**i, "reduction": c.patch_size * 2**i, "module": f"layers.{i}"}
                for i in range(c.num_layers)]

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments that the official recipe excludes from weight decay."""
        return {"relative_position_bias_table", "absolute_pos_embed", "logit_scale", "cpb_mlp"}

    # -- internals -------------------------------------------------------------------------
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.config)
        w = self.patch_embed.proj.weight
        if isinstance(w, torch.Tensor) and x.dtype != w.dtype and autocast_dtype(x.device.type) is None:
            raise ValueError(f"The input is {x.dtype} and the model's weights are {w.dtype}; convert one to the "
                             f"other (x.to({w.dtype}) or model.to({x.dtype})), or run under torch.autocast.")
        return self.pos_drop(self.patch_embed(x))  # (B, H/4, W/4, C)

    def _owns_stage_inputs(self, x: torch.Tensor) -> bool:
        """True when each stage's input is a tensor this forward created and nothing else holds: the
        stem and the patch mergings are this file's plain modules (each returns a fresh tensor) and no
        hook anywhere could have kept one. A stage may then overwrite its input instead of copying it
        (only the CPU inference path does, so elsewhere the ~0.2 ms walk over the modules is skipped)."""
        return (x.device.type == "cpu" and type(self.patch_embed) is PatchEmbed and type(self.pos_drop) is nn.Dropout
                and all(layer.downsample is None or type(layer.downsample) is PatchMerging for layer in self.layers)
                and not has_hooks(self))


def _weights_loaded(module: nn.Module, incompatible_keys) -> None:  # a function, so that models still pickle
    drop_caches(module)


def _bad_index(i: int, n: int) -> int:
    raise ValueError(f"Stage index {i} is out of range for a model with {n} stages (use 0..{n - 1}).")


def _check_input(x: torch.Tensor, config: SwinConfig) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"Expected a torch.Tensor of shape (B, {config.in_chans}, H, W), got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(f"Expected a 4-D input (B, {config.in_chans}, H, W), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"Expected a floating-point image tensor, got dtype {x.dtype}; "
                         "convert with x.float() (and normalise) first.")
    if x.shape[1] != config.in_chans:
        raise ValueError(f"Expected {config.in_chans} input channels in dim 1 (NCHW), got shape {tuple(x.shape)}.")
    if x.shape[2] < config.patch_size or x.shape[3] < config.patch_size:
        raise ValueError(f"Input height and width must be at least the patch size {config.patch_size}, "
                         f"got {x.shape[2]}x{x.shape[3]}.")


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating W-MSA / SW-MSA, then patch merging (except the last)."""

    def __init__(self, config: SwinConfig, dim: int, depth: int, num_heads: int, pretrained_window: int,
                 drop_path: list[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(config, dim, num_heads, shift=0 if j % 2 == 0 else config.window_size // 2,
                                 pretrained_window=pretrained_window, drop_path=drop_path[j])
            for j in range(depth)])
        self.downsample = PatchMerging(dim, config.version, config.backend) if downsample else None

    def forward(self, x: torch.Tensor, grad_checkpointing: bool = False, return_before_merge: bool = False,
                consume_input: bool = False):
        """``consume_input``: the caller hands ``x`` over (nothing else holds it), so the CPU inference
        path may run the blocks in place on it instead of on a copy."""
        if cpu_tiled.eligible(self, x):  # CPU inference: the same blocks, chunk by chunk in cache
            x = cpu_tiled.run_blocks(self.blocks, x, consume=consume_input)
        else:
            for blk in self.blocks:
                if grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        before_merge = x
        if self.downsample is not None:
            x = self.downsample(x)
        return (x, before_merge) if return_before_merge else x


class SwinTransformerBlock(nn.Module):
    """V1: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).
    V2 (res-post-norm): x + DropPath(LN(Attn(x))), then x + DropPath(LN(MLP(x)))."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift: int, pretrained_window: int,
                 drop_path: float):
        super().__init__()
        self.post_norm = config.version == 2
        self.window_size = config.window_size
        self.shift_size = shift
        self.mask_padding = config.mask_padding
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, config.window_size, config.version, config.qkv_bias,
                                    pretrained_window, config.attn_drop_rate, config.drop_rate, config.backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.drop_rate, config.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if self.attn.backend == "fused" and fused_block_eligible(self, x):  # inference: each half below in one kernel
            return fused_mlp_half(self, fused_attention_half(self, x))
        residual = self.drop_path.residual  # x + DropPath(branch(x)), the branch run on kept samples only
        if self.post_norm:
            x = residual(x, lambda t: self.norm1(self._shifted_window_attention(t)))
            return residual(x, lambda t: self.norm2(self.mlp(t)))
        x = residual(x, lambda t: self._shifted_window_attention(self.norm1(t)))
        return residual(x, lambda t: self.mlp(self.norm2(t)))

    def _shifted_window_attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, Wd, C = x.shape
        window, shift = W.window_and_shift(H, Wd, self.window_size, self.shift_size)
        return self.attn(x, window, shift, self.mask_padding)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window of a (B, H, W, C) map, with relative position bias.

    V1: softmax(q k^T / sqrt(d) + B) v, B gathered from a learned ((2M-1)^2, heads) table.
    V2: cosine attention scaled by exp(logit_scale), B = 16 sigmoid(MLP(log-spaced coordinates)).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, version: int, qkv_bias: bool,
                 pretrained_window: int, attn_drop: float, proj_drop: float, backend: str = "reference"):
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.version, self.pretrained_window = version, pretrained_window
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        if version == 1:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(dim))
                self.v_bias = nn.Parameter(torch.zeros(dim))
            else:
                self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_special_parameters(self) -> None:
        if self.version == 1:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            nn.init.constant_(self.logit_scale, math.log(10.0))
            if self.q_bias is not None:
                nn.init.zeros_(self.q_bias)
                nn.init.zeros_(self.v_bias)

    def qkv_bias(self) -> torch.Tensor | None:
        """The (3C,) qkv bias; V2 keeps q and v biases separately and k's is zero."""
        if self.version == 1:
            return self.qkv.bias
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 3C). A plain ``nn.Linear`` runs as one product with the whole bias;
        anything in its place (a LoRA wrapper, a quantized or pruned layer, a hooked one) is called
        as a module, and V2's q/v biases are added after it."""
        if is_plain(self.qkv, nn.Linear):
            return self._linear(x, self.qkv.weight, self.qkv_bias())
        qkv = self.qkv(x)
        bias = None if self.version == 1 else self.qkv_bias()
        return qkv if bias is None else qkv + bias.to(qkv.dtype)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C): ``proj`` (a plain ``nn.Linear`` as one product, anything else called)."""
        if is_plain(self.proj, nn.Linear):
            return self._linear(x, self.proj.weight, self.proj.bias)
        return self.proj(x)

    def _linear(self, x, weight, bias):
        # the fast backends train in fp32 on CPU with oneDNN's products (swin.ops.onednn); the reference is F.linear
        return onednn.linear(x, weight, bias) if fast(self.backend) else F.linear(x, weight, bias)

    def position_bias(self, window: int) -> torch.Tensor:
        """(heads, N, N) relative position bias for a window x window window."""
        N = window * window
        if self.version == 1:
            index = W.relative_index(window, self.window_size, self.relative_position_bias_table.device)
            bias = self.relative_position_bias_table[index.view(-1)].view(N, N, -1)  # (N, N, heads)
            return bias.permute(2, 0, 1)
        coords = W.log_coords(window, self.pretrained_window, self.logit_scale.device)  # ((2w-1)^2, 2)
        w = self.cpb_mlp[0].weight  # a method, not a tensor, on a dynamically quantized Linear (fp32 input)
        table = self.cpb_mlp(coords.to(w.dtype if isinstance(w, torch.Tensor) else torch.float32))  # ((2w-1)^2, heads)
        index = W.relative_index(window, window, self.logit_scale.device)
        bias = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (heads, N, N)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, window: int, shift: int, mask_padding: bool = False) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad, cyclic shift, attend per window, reverse, crop."""
        if fast(self.backend):
            from .ops import window_attention

            return window_attention(self, x, window, shift, mask_padding)
        B, H, Wd, C = x.shape
        x = W.pad_to_window(x, window)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = W.window_partition(x, window)  # (B*nW, N, C)
        mask = W.shift_mask(H, Wd, window, shift, mask_padding, x.device)  # (nW, N, N) or None
        out = self.attend(windows, self.position_bias(window), mask)  # (B*nW, N, C)
        x = W.window_reverse(out, window, Hp, Wp)  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :Wd, :] if (Hp != H or Wp != Wd) else x

    def attend(self, windows: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Plain attention over (B*nW, N, C) windows with a (heads, N, N) bias and a (nW, N, N) mask."""
        Bw, N, C = windows.shape
        qkv = self.project_qkv(windows).view(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B*nW, heads, N, d)
        if self.version == 1:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        else:
            # normalised in fp32: in a pure fp16 model F.normalize's eps (1e-12) rounds to 0, and a padded
            # token's k (V2 has no k bias: k = 0) became 0/0 = NaN for every window holding one
            q, k = (F.normalize(t.to(torch.promote_types(t.dtype, torch.float32)), dim=-1).to(t.dtype) for t in (q, k))
            attn = q @ k.transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = attn + bias.unsqueeze(0)  # (B*nW, heads, N, N)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(-1, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0).to(attn.dtype)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    # where 16-bit inference runs fc1 + GELU as one cuBLASLt call (GELU's tanh form; swin.ops.mlp).
    # H200, Swin-T b256 bf16 compiled (stop 25): 1.18x as a 16-bit model, 1.11x under autocast, the
    # same parity to fp32 (6.4e-3, bf16's own rounding; tanh and erf GELU differ by < 1e-3 there).
    # fp32 never takes it. () restores the erf GELU everywhere.
    LT_GELU_DEVICES: tuple[str, ...] = ("cuda",)

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, backend: str = "reference"):
        super().__init__()
        self.backend = backend  # any fast backend: GELU recomputed in backward (swin.ops.mlp)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if mlp_ops.eligible(self, x):  # training: the same function, saving one hidden tensor, not two
            return mlp_ops.mlp_recompute_gelu(self, x)
        if mlp_ops.gelu_epilogue_eligible(self, x):  # backend "fused", CUDA inference: fc1 + GELU, one product
            return mlp_ops.mlp_gelu_epilogue(self, x)
        if mlp_ops.lt_gelu_eligible(self, x):  # 16-bit inference where opted in: fc1 + GELU, one cuBLASLt call
            return mlp_ops.mlp_lt_gelu(self, x)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/P, W/P, C): pad to a multiple of P, conv k=s=P, LayerNorm."""

    # where the convolution runs as one product: CUDA, 16-bit products (autocast or a 16-bit model).
    # In fp32 cuDNN may run the convolution in TF32 (torch.backends.cudnn.allow_tf32, on by default)
    # and cuBLAS the product in full fp32: the two would differ by ~1e-3, so fp32 keeps the
    # convolution and the reference path's numbers. Tests add "cpu" and float32.
    PRODUCT_DEVICES = ("cuda",)
    PRODUCT_DTYPES = (torch.float16, torch.bfloat16)

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, backend: str = "reference"):
        super().__init__()
        self.patch_size = patch_size
        self.backend = backend  # any but "reference": the convolution as one product where PRODUCT_* say
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        H, Wd = x.shape[2], x.shape[3]
        if H % P or Wd % P:
            x = F.pad(x, (0, (P - Wd % P) % P, 0, (P - H % P) % P))
        if (x.device.type in self.PRODUCT_DEVICES and self.backend != "reference"
                and (autocast_dtype(x.device.type) or x.dtype) in self.PRODUCT_DTYPES and self._patchwise()):
            # a k = s = P convolution is one product over each patch's (C, P, P) values: one copy
            # that gathers the patches, one cuBLAS call. cuDNN's generic engine for 3 input channels
            # took 0.50 ms of an 11.4 ms compiled Swin-T step on an H200 (b256 bf16, stop 13), and
            # the channels-last copy before it 0.21 ms, for 0.23 GB of input and output.
            B, C, Hp, Wp = x.shape
            patches = x.reshape(B, C, Hp // P, P, Wp // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, P, P)
            weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (E, C*P*P), the same order
            return self.norm(F.linear(patches.reshape(B, Hp // P, Wp // P, -1), weight, self.proj.bias))
        # channels-last input: the convolution writes (B, H/P, W/P, C) memory, so the permute below
        # is free and LayerNorm reads it in place (same values; CPU Swin-T b8 stem 10.8 -> 7.2 ms;
        # on this CPU the product form above ran 2.35 ms against the convolution's 1.6-2.0)
        # (vmap has no channels-last copy: inside torch.func transforms the input goes as it is)
        x = self.proj(x if transforming() else x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/P, W/P, C)

    def _patchwise(self) -> bool:
        """proj is still a plain, hook-free k = s = P convolution without padding or dilation."""
        p, P = self.proj, self.patch_size
        return (is_plain(p, nn.Conv2d) and p.kernel_size == p.stride == (P, P) and p.padding == (0, 0)
                and p.dilation == (1, 1) and p.groups == 1)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C). V1: LN(4C) then Linear; V2: Linear then LN(2C)."""

    def __init__(self, dim: int, version: int, backend: str = "reference"):
        super().__init__()
        self.backend = backend  # any but "reference": CPU inference gathers (and V1 normalises) in one C pass
        self.post_norm = version == 2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if self.post_norm else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_tiled.merge_eligible(self, x):  # CPU inference: the gather (and V1's norm) in one pass
            return cpu_tiled.patch_merging(self, x)
        x = W.merge_2x2(x)  # each 2x2 neighbourhood's four tokens side by side, the official order
        if self.post_norm:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 2C)


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)  # one pass over x (timm's order of operations, too)

    # where residual() skips dropped samples; not CUDA: there it ran at 0.64x the mask product (H200,
    # stop 15: nonzero() syncs the host, and each new count of kept samples is a new kernel input shape)
    SKIP_DEVICES = ("cpu",)

    def residual(self, x: torch.Tensor, branch) -> torch.Tensor:
        """``x + self(branch(x))``, computing the branch only for the samples it keeps.

        A dropped sample's branch is multiplied by 0, so computing it is wasted work: on average the
        fraction p of the branch's products. In eager training the per-sample mask is drawn first
        (the same Bernoulli draw as :meth:`forward`), the branch runs on the kept samples and its
        output, scaled by 1/(1-p), is added to their rows. The values and every gradient are those of
        ``x + self(branch(x))`` with that mask. When all samples drop, the branch still runs (times
        0) so that its parameters get zero gradients rather than none, as an optimizer expects.
        """
        if self.p == 0.0 or not self.training:
            return x + branch(x)
        if (x.device.type not in self.SKIP_DEVICES or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or transforming()):  # data-dependent shapes: the plain mask product
            return x + self(branch(x))
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0]).bernoulli_(keep)
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == x.shape[0]:
            return torch.add(x, branch(x), alpha=1.0 / keep)
        if idx.numel() == 0:
            return x + branch(x) * mask.view((-1,) + (1,) * (x.ndim - 1))
        y = branch(x.index_select(0, idx))
        dtype = torch.promote_types(x.dtype, y.dtype)  # as x + y would (autocast: a bf16 branch, fp32 x)
        return x.to(dtype).index_add(0, idx, y.to(dtype), alpha=1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
