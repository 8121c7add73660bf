"""swin: Swin Transformer V1 and V2 that equal the references, at any input size, fast."""
from __future__ import annotations

from typing import Any

from .config import MODELS, SwinConfig, get_config, list_models
from .flops import flops
from .model import SwinTransformer

__all__ = ["SwinConfig", "SwinTransformer", "create_model", "get_config", "list_models", "flops", "load_checkpoint",
           "convert_state_dict", "detect_format"]
__version__ = "0.1.0"


def create_model(name: str, *, num_classes: int | None = 1000, img_size: int | tuple[int, int] | None = None,
                 window_size: int | None = None, drop_path_rate: float | None = None,
                 **overrides: Any) -> SwinTransformer:
    """Build a registered model by name (see :func:`list_models`), with config overrides.

    ``num_classes``: the classifier's classes (default 1000, for every variant, the small ones too;
    0: no head, the model returns pooled features; None: the variant's own count). ``img_size``: the
    nominal size (an int or (H, W)); the model takes any size at run time. ``window_size``: the
    attention window. ``drop_path_rate``: stochastic depth (None: the variant's). ``**overrides``: any
    other :class:`SwinConfig` field (``embed_dim``, ``depths``, ``mask_padding``, ``backend``, ...).
    Bad values raise ValueError naming the field.
    """
    config = get_config(name, num_classes=num_classes, img_size=img_size, window_size=window_size,
                        drop_path_rate=drop_path_rate, **overrides)
    return SwinTransformer(config)


def __getattr__(name: str):  # lazy: the converter is only imported when used
    if name in ("load_checkpoint", "convert_state_dict", "detect_format"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'swin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
