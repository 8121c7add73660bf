"""Model configuration: one dataclass, and the variant table as data."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class SwinConfig:
    """Everything that defines a Swin V1/V2 network.

    ``img_size`` is only the nominal training size (used for FLOPs and as the default
    of data pipelines); the model itself accepts any input size at run time.
    """

    version: int = 1  # 1 = Swin, 2 = SwinV2
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    # V2: the window size each stage was pre-trained with (0 = the current window).
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    # Mask attention to the zero tokens added when a map is padded to a window multiple.
    # False reproduces the official/torchvision/HF numbers; True makes the output independent of padding.
    mask_padding: bool = False
    # A LayerNorm on each stage's output map, as detection/segmentation backbones have (the official Swin
    # detection code, mmdet, mmseg, HF SwinBackbone: norm0..norm3): stage i < last by ``out_norms[i]``, the
    # last stage by ``norm``. forward_intermediates then norms every map by default.
    out_norms: bool = False
    # Which implementation of window attention to use: "auto" (fastest available), "reference" (the plain
    # PyTorch spec in model.py), "sdpa", "triton" or "fused" ("triton", plus each half of a stage-1 block
    # as one kernel in inference); see swin.ops. All compute the same function.
    backend: str = "auto"

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (self.num_layers - 1))

    def validate(self) -> "SwinConfig":
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}.")
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head), got {self.num_classes!r}.")
        if len(self.img_size) != 2 or not all(_is_int(s) and s >= 1 for s in self.img_size):
            raise ValueError(f"img_size must be (height, width) in pixels, got {self.img_size!r}.")
        if not self.depths or not all(_is_int(d) and d >= 1 for d in self.depths):
            raise ValueError(f"depths must be one positive block count per stage, got {self.depths!r}.")
        if not all(_is_int(h) and h >= 1 for h in self.num_heads):
            raise ValueError(f"num_heads must be positive integers, got {self.num_heads!r}.")
        if not all(_is_int(w) and w >= 0 for w in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be integers >= 0, got {self.pretrained_window_sizes!r}.")
        if not self.mlp_ratio > 0 or round(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}.")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have the same length.")
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % h:
                raise ValueError(f"stage {i} width {self.embed_dim * 2**i} is not divisible by its {h} heads.")
        if len(self.pretrained_window_sizes) != len(self.depths):
            raise ValueError("pretrained_window_sizes needs one entry per stage.")
        if self.window_size < 1 or self.patch_size < 1:
            raise ValueError("window_size and patch_size must be positive.")
        for name in ("qkv_bias", "mask_padding", "out_norms"):
            value = getattr(self, name)
            if isinstance(value, (float, str)) or value not in (False, True):  # 0/1 and numpy bools are fine
                raise ValueError(f"{name} must be True or False, got {value!r}.")
            object.__setattr__(self, name, bool(value))
        if self.backend not in ("auto", "reference", "sdpa", "triton", "fused"):
            raise ValueError(f"backend must be one of auto, reference, sdpa, triton, fused; got {self.backend!r}.")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _v1(embed_dim, depths, heads, window=7, img=224, **kw) -> SwinConfig:
    return SwinConfig(version=1, img_size=(img, img), embed_dim=embed_dim, depths=depths, num_heads=heads,
                      window_size=window, **kw)


def _v2(embed_dim, depths, heads, window=8, img=256, pretrained=(0, 0, 0, 0), **kw) -> SwinConfig:
    return SwinConfig(version=2, img_size=(img, img), embed_dim=embed_dim, depths=depths, num_heads=heads,
                      window_size=window, pretrained_window_sizes=pretrained, **kw)


_T, _S = (2, 2, 6, 2), (2, 2, 18, 2)
_H96, _H128, _H192 = (3, 6, 12, 24), (4, 8, 16, 32), (6, 12, 24, 48)

# Drop-path rates are those of the official ImageNet-1K recipes.
MODELS: dict[str, SwinConfig] = {
    "swin_t": _v1(96, _T, _H96, drop_path_rate=0.2),
    "swin_s": _v1(96, _S, _H96, drop_path_rate=0.3),
    "swin_b": _v1(128, _S, _H128, drop_path_rate=0.5),
    "swin_l": _v1(192, _S, _H192, drop_path_rate=0.2),
    "swin_b_384": _v1(128, _S, _H128, window=12, img=384, drop_path_rate=0.2),
    "swin_l_384": _v1(192, _S, _H192, window=12, img=384, drop_path_rate=0.2),
    "swinv2_t_w8": _v2(96, _T, _H96, drop_path_rate=0.2),
    "swinv2_t_w16": _v2(96, _T, _H96, window=16, drop_path_rate=0.2),
    "swinv2_s_w8": _v2(96, _S, _H96, drop_path_rate=0.3),
    "swinv2_s_w16": _v2(96, _S, _H96, window=16, drop_path_rate=0.3),
    "swinv2_b_w8": _v2(128, _S, _H128, drop_path_rate=0.5),
    "swinv2_b_w16": _v2(128, _S, _H128, window=16, drop_path_rate=0.5),
    # ImageNet-22K pre-training shapes and their fine-tunes (window 12 -> 16/24).
    "swinv2_b_w12_192": _v2(128, _S, _H128, window=12, img=192, num_classes=21841, drop_path_rate=0.2),
    "swinv2_l_w12_192": _v2(192, _S, _H192, window=12, img=192, num_classes=21841, drop_path_rate=0.2),
    "swinv2_b_w16_256": _v2(128, _S, _H128, window=16, pretrained=(12, 12, 12, 6), drop_path_rate=0.2),
    "swinv2_l_w16_256": _v2(192, _S, _H192, window=16, pretrained=(12, 12, 12, 6), drop_path_rate=0.2),
    "swinv2_b_w24_384": _v2(128, _S, _H128, window=24, img=384, pretrained=(12, 12, 12, 6), drop_path_rate=0.2),
    "swinv2_l_w24_384": _v2(192, _S, _H192, window=24, img=384, pretrained=(12, 12, 12, 6), drop_path_rate=0.2),
    # Small-image variants (digits, CIFAR): patch 2, window 4.
    "swin_micro": SwinConfig(img_size=(32, 32), patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8),
                             window_size=4, pretrained_window_sizes=(0, 0, 0), drop_path_rate=0.1, num_classes=10),
    "swinv2_micro": SwinConfig(version=2, img_size=(32, 32), patch_size=2, embed_dim=48, depths=(2, 2, 2),
                               num_heads=(2, 4, 8), window_size=4, pretrained_window_sizes=(0, 0, 0),
                               drop_path_rate=0.1, num_classes=10),
    # The digits demo: 8x8 digits upsampled to 32x32, so patch 4 gives one token per original pixel
    # (8x8 tokens, window 4) and trains ~5x faster than patch 2 at the same accuracy.
    "swin_micro_p4": SwinConfig(img_size=(32, 32), patch_size=4, embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8),
                                window_size=4, pretrained_window_sizes=(0, 0, 0), drop_path_rate=0.1, num_classes=10),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODELS)


def get_config(name: str, **overrides: Any) -> SwinConfig:
    """The config registered under ``name`` with ``overrides`` applied (``None`` values are ignored)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=4, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} swin.list_models() lists all {len(MODELS)} names.")
    cfg = MODELS[name]
    unknown = set(overrides) - set(SwinConfig.__dataclass_fields__)  # before dropping Nones: YAML's {a:1} is {"a:1": None}
    if unknown:
        colon = [k for k in unknown if isinstance(k, str) and ":" in k]
        hint = f" (YAML needs a space after the colon: {{{colon[0].replace(':', ': ', 1)}}})" if colon else ""
        raise ValueError(f"Unknown config field(s) {sorted(unknown, key=str)}{hint}; valid fields: "
                         f"{sorted(SwinConfig.__dataclass_fields__)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "img_size" in overrides:
        s = overrides["img_size"]
        overrides["img_size"] = (int(s), int(s)) if isinstance(s, int) else tuple(int(v) for v in s)
    for key in ("depths", "num_heads", "pretrained_window_sizes"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    if "depths" in overrides and "pretrained_window_sizes" not in overrides:
        overrides["pretrained_window_sizes"] = (0,) * len(overrides["depths"])
    return replace(cfg, **overrides).validate()
