"""Analytic FLOPs (multiply-accumulates), counted the way the official ``flops()`` methods count.

Matmul and linear multiply-adds plus C*H*W per LayerNorm; softmax, bias adds and masks are free.
At sizes the official code accepts this reproduces its numbers exactly, including its final-norm
term (``num_features * H0 * W0 // 2**num_layers``). At other sizes the same rules are applied to the
maps this implementation really computes: the stem and windows see padded maps, norms and MLPs
the real tokens.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .config import SwinConfig
from .windows import padded_size, window_and_shift


def _attn_flops(N: int, dim: int, heads: int) -> int:
    # qkv, q @ k^T, attn @ v, proj
    return N * dim * 3 * dim + heads * N * (dim // heads) * N + heads * N * N * (dim // heads) + N * dim * dim


def config_flops(config: SwinConfig, img_size: tuple[int, int] | int | None = None) -> int:
    """FLOPs of one forward pass of a model with ``config`` at ``img_size`` (H, W)."""
    if img_size is None:
        img_size = config.img_size
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    H_in, W_in = (int(v) for v in img_size)
    if H_in < config.patch_size or W_in < config.patch_size:
        raise ValueError(f"img_size must be at least the patch size {config.patch_size}, got {H_in}x{W_in}.")
    P, C = config.patch_size, config.embed_dim
    H, W = math.ceil(H_in / P), math.ceil(W_in / P)
    H0, W0 = H, W
    flops = H * W * C * config.in_chans * P * P + H * W * C  # patch embed conv + norm
    for i, depth in enumerate(config.depths):
        dim = C * 2**i
        heads = config.num_heads[i]
        window, _ = window_and_shift(H, W, config.window_size, 0)
        Hp, Wp = padded_size(H, W, window)
        nW = (Hp // window) * (Wp // window)
        per_block = (2 * dim * H * W  # norm1, norm2
                     + nW * _attn_flops(window * window, dim, heads)
                     + int(2 * H * W * dim * dim * config.mlp_ratio))
        flops += depth * per_block
        if i < config.num_layers - 1:
            Ho, Wo = math.ceil(H / 2), math.ceil(W / 2)
            flops += Ho * Wo * 4 * dim * 2 * dim
            flops += H * W * dim // 2 if config.version == 2 else H * W * dim  # merging norm (2C vs 4C)
            H, W = Ho, Wo
    flops += config.num_features * H0 * W0 // (2 ** config.num_layers)  # final norm, as the official counts it
    flops += config.num_features * config.num_classes
    return int(flops)


def flops(model: nn.Module, img_size: tuple[int, int] | int | None = None) -> int:
    """FLOPs (multiply-accumulates) of ``model`` for one image of ``img_size`` (default: its nominal size)."""
    config = getattr(model, "config", None)
    if not isinstance(config, SwinConfig):
        raise ValueError("flops() needs a model built by swin.create_model (it reads model.config).")
    return config_flops(config, img_size)
