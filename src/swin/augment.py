"""RandAugment as the official Swin recipe runs it: timm's ``rand-m9-mstd0.5-inc1``.

The official training (microsoft/Swin-Transformer, ``AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'``)
uses timm's RandAugment, which is not torchvision's: 15 operations (the "increasing" set: Invert
and SolarizeAdd in, Identity out, every enhancement moving away from "no change" as the magnitude
grows), each of the 2 chosen operations applied with probability 0.5, and the magnitude drawn per
operation from N(9, 0.5) clipped to [0, 10]. Geometric operations use bicubic resampling and fill
with the dataset mean.

The operations are the same PIL calls with the same arguments as timm's, so for the same random
draws the output is identical (tests/test_data.py checks this against timm itself). The draws come
from ``rng`` (default: torch's global generator, which :class:`swin.data.Transformed` seeds per
sample, so augmentation is a function of (seed, epoch, index)). Accepts a PIL image or a uint8
(3, H, W) tensor and returns the same kind.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

LEVEL_MAX = 10.0  # magnitudes are on a 0..10 scale

# timm's _RAND_INCREASING_TRANSFORMS, in its order (the order matters for identical draws)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")

_ENHANCE = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
            "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}


class TorchRandom:
    """The random draws RandAugment makes, from torch's global generator."""

    def choices(self, n: int, k: int) -> list[int]:
        return torch.randint(0, n, (k,)).tolist()

    def uniform(self) -> float:
        return float(torch.rand(()))

    def gauss(self, mean: float, std: float) -> float:
        return mean + std * float(torch.randn(()))


class RandAugment:
    """``num_ops`` operations drawn uniformly (with replacement) from :data:`OPS`, each applied with
    probability ``prob`` at magnitude N(``magnitude``, ``magnitude_std``) clipped to [0, 10]."""

    def __init__(self, magnitude: float = 9, num_ops: int = 2, prob: float = 0.5, magnitude_std: float = 0.5,
                 fill: tuple[int, int, int] = (128, 128, 128), interpolation=Image.BICUBIC, rng=None):
        if not 0 <= magnitude <= LEVEL_MAX:
            raise ValueError(f"RandAugment magnitude must be in [0, {LEVEL_MAX:g}], got {magnitude}.")
        self.magnitude, self.num_ops, self.prob, self.magnitude_std = magnitude, num_ops, prob, magnitude_std
        self.fill, self.interpolation = tuple(fill), interpolation
        self.rng = rng or TorchRandom()

    def __call__(self, img):
        tensor = isinstance(img, torch.Tensor)
        if tensor:
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        for i in self.rng.choices(len(OPS), self.num_ops):
            img = self.apply(OPS[i], img)
        if tensor:
            img = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        return img

    def apply(self, name: str, img: Image.Image) -> Image.Image:
        """One operation, drawing (in timm's order) whether to apply it, its magnitude and its sign."""
        if self.prob < 1.0 and self.rng.uniform() > self.prob:
            return img
        m = self.rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
        level = max(0.0, min(m, LEVEL_MAX)) / LEVEL_MAX  # 0..1
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name == "Invert":
            return ImageOps.invert(img)
        if name == "PosterizeIncreasing":  # keep 4 down to 0 bits
            bits = 4 - int(level * 4)
            # 0 bits (magnitude 10) is a black image; Pillow >= 10 refuses it (timm then raises)
            return ImageOps.posterize(img, bits) if bits else img.point([0] * 256 * len(img.getbands()))
        if name == "SolarizeIncreasing":  # invert above a threshold falling from 256 to 0
            return ImageOps.solarize(img, 256 - min(256, int(level * 256)))
        if name == "SolarizeAdd":  # add up to 110 below 128
            add = min(128, int(level * 110))
            lut = [min(255, i + add) if i < 128 else i for i in range(256)]
            return img.point(lut * 3 if img.mode == "RGB" else lut) if img.mode in ("L", "RGB") else img
        if name in _ENHANCE:  # factor 1 -/+ up to 0.9, at least 0.1
            return _ENHANCE[name](img).enhance(max(0.1, 1.0 + self._signed(level * 0.9)))
        geometric = dict(resample=self.interpolation, fillcolor=self.fill)
        if name == "Rotate":  # up to +-30 degrees
            return img.rotate(self._signed(level * 30.0), **geometric)
        if name in ("ShearX", "ShearY"):  # up to +-0.3
            f = self._signed(level * 0.3)
            return img.transform(img.size, Image.AFFINE, (1, f, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, f, 1, 0),
                                 **geometric)
        if name in ("TranslateXRel", "TranslateYRel"):  # up to +-45% of the side
            pct = self._signed(level * 0.45)
            shift = (1, 0, pct * img.size[0], 0, 1, 0) if name == "TranslateXRel" else (1, 0, 0, 0, 1, pct * img.size[1])
            return img.transform(img.size, Image.AFFINE, shift, **geometric)
        raise ValueError(f"Unknown RandAugment operation {name!r}; choose from {', '.join(OPS)}.")

    def _signed(self, v: float) -> float:
        return -v if self.rng.uniform() > 0.5 else v

    def __repr__(self) -> str:
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.prob}, "
                f"ops={len(OPS)})")
