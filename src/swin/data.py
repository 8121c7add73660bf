"""Datasets (digits, CIFAR, ImageFolder) and the transform presets, all through torchvision.transforms.v2.

Every training sample is augmented under its own seed, drawn from (run seed, epoch, index): the
augmentation of an image does not depend on the worker that loads it, on the number of processes, or
on where a run was resumed. That is what makes ``--resume`` exact, and DDP equal to one process where
nothing else is drawn per micro-batch (drop path and MixUp/CutMix are).

A file that cannot be read becomes a *skipped* sample: the loader drops it from its batch and reports
its path and why (the error), and the trainer warns and counts it; it never stops a run.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from .augment import RandAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = ("digits", "cifar10", "cifar100")


@dataclass
class DataSplits:
    """What a run trains and validates on; ``train``/``val`` yield (image, label) before transforms."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool  # True: cheap to index, no worker processes needed


# -- base datasets ------------------------------------------------------------------------------

class TensorImages(Dataset):
    """Images held in memory as a uint8 (N, 3, H, W) tensor, with int labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Any, int]:
        return self.images[i], int(self.labels[i])


def open_rgb(path: str | os.PathLike):
    """The image at ``path`` as an 8-bit RGB PIL image, whatever its mode. Pillow's own conversion clips
    16-bit and 32-bit integer pixels ("I;16", "I") at 255 and float pixels ("F") at their raw values, which
    turns a 16-bit scan into a black-and-white mask; those are rescaled first: integers from 0..65535,
    floats from 0..1 (or 0..255 where a value exceeds 1). EXIF orientation is not applied (as torchvision
    and timm load images, for training and inference alike)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            if im.mode.startswith("I"):
                a = a / 257.0
            elif a.size and np.nanmax(a) <= 1.0:
                a = a * 255.0
            a = np.nan_to_num(a, nan=0.0)
            return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (any depth), sorted; hidden files and folders (a name starting
    with ".": macOS's ``._*`` resource forks, ``.ipynb_checkpoints`` copies) are left out."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):  # into linked folders too, as ImageFolder does
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree (or a second link to one folder): walked once
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMG_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


class ImageFiles(Dataset):
    """Images on disk as a list of (path, label); an unreadable file raises from :meth:`load`."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        return open_rgb(path), label

    def path(self, i: int) -> str:
        return self.samples[i][0]


class PILArrays(Dataset):
    """CIFAR-style arrays (N, H, W, 3) uint8, handed out as PIL images."""

    def __init__(self, data, labels: Sequence[int]):
        self.data, self.labels = data, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return Image.fromarray(self.data[i]), int(self.labels[i])


def load_digits(img_size: int = 32) -> tuple[TensorImages, TensorImages, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): a fixed stratified 80/20 split,
    upsampled (bicubic) to ``img_size`` and repeated to 3 channels. No download."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    X, y = _load(return_X_y=True)
    idx_train, idx_val = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=y)
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    labels = torch.tensor(y, dtype=torch.int64)
    tr, va = torch.tensor(idx_train), torch.tensor(idx_val)
    return TensorImages(x[tr], labels[tr]), TensorImages(x[va], labels[va]), [str(d) for d in range(10)]


def load_cifar(name: str, root: str | os.PathLike) -> tuple[PILArrays, PILArrays, list[str]]:
    """CIFAR-10/100 from ``root``, downloaded there by torchvision when missing."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    try:
        train = cls(root, train=True, download=False)
    except RuntimeError:  # not there yet
        try:
            train = cls(root, train=True, download=True)
        except Exception as e:  # URLError, socket errors, HTTP errors, a bad archive
            raise FileNotFoundError(
                f"{pretty} is not in {root} and could not be downloaded ({type(e).__name__}: no internet?); "
                f"put the torchvision copy there or use --data digits.") from None
    val = cls(root, train=False, download=False)
    return PILArrays(train.data, train.targets), PILArrays(val.data, val.targets), list(train.classes)


def _not_a_folder(path: Path) -> str:
    return "is a file, not a folder" if path.exists() else "does not exist"


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` absolute and normalised (``~`` expanded, ``..`` and ``.`` folded away; links kept as given)."""
    return os.path.normpath(Path(path).expanduser().absolute())


def absolute_data(data: str) -> str:
    """``data`` as a run records it: a built-in name as is, a folder as an absolute path."""
    return data if data in BUILTIN else absolute_path(data)


def scan_image_folder(root: str | os.PathLike,
                      classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of ``root/<class>/*.<image ext>``; labels index ``classes`` (default: sorted folders)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ValueError(f"{root} has no class folders; expected {root}/<class name>/<images>.")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folder(s) {unknown[:5]} that the training split does not have.")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in found:
        files = image_files(root / name)
        if not files:
            raise ValueError(f"Class folder {root / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                             "add images or remove the folder.")
        samples += [(str(p), index[name]) for p in files]
    return samples, classes


def build_splits(data: str, img_size: int, root: str | os.PathLike = "data") -> DataSplits:
    """Resolve ``--data``: "digits", "cifar10", "cifar100", or a folder with ``train/`` and ``val/``."""
    if data == "digits":
        train, val, classes = load_digits(img_size)
        return DataSplits("digits", train, val, classes, DIGITS_MEAN, DIGITS_STD, in_memory=True)
    if data in ("cifar10", "cifar100"):
        train, val, classes = load_cifar(data, root)
        return DataSplits(data, train, val, classes, IMAGENET_MEAN, IMAGENET_STD, in_memory=False)
    path = Path(data).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Data directory {data} {_not_a_folder(path)} (use a folder with train/ and val/, "
                                f"or one of {', '.join(BUILTIN)}).")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise FileNotFoundError(f"{path} has no {split}/ folder; expected {path}/{split}/<class>/<images>.")
    train_samples, classes = scan_image_folder(path / "train")
    val_samples, _ = scan_image_folder(path / "val", classes)
    return DataSplits(path.name, ImageFiles(train_samples), ImageFiles(val_samples), classes,
                      IMAGENET_MEAN, IMAGENET_STD, in_memory=False)


# -- transforms ----------------------------------------------------------------------------------

def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], *,
                    crop_scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5, rand_augment: int = 9,
                    color_jitter: float = 0.4, reprob: float = 0.25) -> v2.Compose:
    """The official pipeline (timm's ``create_transform`` with the Swin config): RandomResizedCrop
    (bicubic), flip, RandAugment ``rand-m{rand_augment}-mstd0.5-inc1`` (swin.augment; 0 = off),
    ColorJitter only when RandAugment is off, normalise, RandomErasing filled with per-pixel normal
    noise (``REMODE = 'pixel'``)."""
    t: list[Callable] = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                                              interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if hflip > 0:
        t.append(v2.RandomHorizontalFlip(hflip))
    if rand_augment > 0:  # on the PIL image (or uint8 tensor), as timm
        t.append(RandAugment(magnitude=rand_augment, magnitude_std=0.5,
                             fill=tuple(min(255, round(255 * m)) for m in mean)))
    elif color_jitter > 0:
        t.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    t += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if reprob > 0:
        t.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(t)


def default_eval_crop(img_size: int) -> float:
    """The official evaluation crop for a size: 0.875 (224 -> resize 256, 256 -> 292) from 33 to 383 px; at
    384 and above none (1.0: the whole image resized to the size), as every official 384 config evaluates
    (``TEST.CROP: False``); none at 32 px and below either, where the official pipeline does not resize
    (``resize_im = IMG_SIZE > 32``: CIFAR-sized images are evaluated whole)."""
    return 1.0 if img_size >= 384 or img_size <= 32 else 0.875


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop: float = 0.875) -> v2.Compose:
    """``crop`` < 1: resize the short side to floor(``img_size / crop``) (bicubic; 224 -> 256, 256 -> 292 at
    0.875, as timm and the official code), centre crop. ``crop`` = 1: resize the whole image to
    ``img_size`` x ``img_size`` (the official ``TEST.CROP: False``, used at 384: the aspect ratio is not
    kept and nothing is cut off; timm's ``crop_pct=1.0`` instead crops the long side). Then normalise."""
    if not 0 < crop <= 1:
        raise ValueError(f"eval_crop must be in (0, 1], got {crop}.")
    size = (img_size, img_size) if crop == 1 else math.floor(img_size / crop)
    resize = v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(img_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def batch_mix(num_classes: int, mixup: float, cutmix: float, switch_prob: float) -> Callable | None:
    """MixUp (Beta(mixup)) or CutMix (Beta(cutmix)), CutMix chosen with ``switch_prob`` when both are on;
    returns soft (B, num_classes) targets. None when both are off."""
    ops, probs = [], []
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        probs.append(switch_prob if mixup > 0 else 1.0)
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        probs.append(1.0 - switch_prob if cutmix > 0 else 1.0)
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops, p=probs)


# -- per-sample seeded augmentation, skip-on-error loading ---------------------------------------

class Skipped(str):
    """The path of a sample that could not be read, with ``reason``: the error, without the path (a corrupt
    file and a valid image over PIL's size limit read differently)."""

    def __new__(cls, path: str, error: BaseException | None = None):
        self = super().__new__(cls, str(path))
        message = str(error or "").replace(f"'{path}'", "").replace(str(path), "").strip()[:200]
        self.reason = f"{type(error).__name__}: {message}" if error is not None else ""
        return self  # (pickled with its reason to and from DataLoader workers, as any str subclass)


def describe_skip(path: str) -> str:
    """A skipped sample's path, with why when known."""
    reason = getattr(path, "reason", "")
    return f"{path} ({reason})" if reason else str(path)


class Transformed(Dataset):
    """``base`` with ``transform``; each sample is transformed under the seed (seed, epoch, index)
    without touching the global RNG. Returns (tensor, label, None) or (None, label, path) when the
    file could not be read or decoded."""

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        try:
            image, label = self.base.load(i)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            path = self.base.path(i) if hasattr(self.base, "path") else f"sample {i}"
            return None, -1, Skipped(path, e)
        state = torch.get_rng_state()  # (torch.random.fork_rng does the same, 300x slower)
        torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
        try:
            return self.transform(image), label, None
        finally:
            torch.set_rng_state(state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & 0x7FFF_FFFF_FFFF_FFFF


def mix_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The seed of one micro-batch's MixUp/CutMix draws: distinct for every (step, rank, micro-batch) up to
    a million ranks and micro-batches a step."""
    return (((seed * 1_000_003 + step) * 1_000_033 + rank) * 1_000_037 + micro) & 0x7FFF_FFFF_FFFF_FFFF


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable samples; return the paths of the skipped ones alongside."""
    ok = [(x, y) for x, y, bad in batch if bad is None]
    skipped = [bad for _, _, bad in batch if bad is not None]
    if not ok:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok], dtype=torch.int64), skipped


class ShardSampler(Sampler[int]):
    """The indices of one rank: a permutation seeded by (seed, epoch), rank r taking every
    ``world``-th index from ``r``, so that rank-local batches of b together are the global batch
    of b * world that one process would take. ``start`` skips the first indices once (resume)."""

    def __init__(self, n: int, world: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        self.n, self.world, self.rank, self.shuffle, self.seed = n, world, rank, shuffle, seed
        self.drop_last, self.epoch, self.start = drop_last, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: self.n // self.world * self.world]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


def worker_init(_: int) -> None:
    """Workers ignore SIGINT: the main process decides how to stop (finish the step, save, exit)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_split(data: str, img_size: int, root: str | os.PathLike = "data",
               classes: list[str] | None = None, by_order: bool = False,
               num_classes: int | None = None) -> tuple[Dataset, list[str], tuple, tuple]:
    """The split ``swin eval`` measures: digits val, CIFAR test, ``DIR/val`` (or ``DIR`` itself when it
    holds class folders). With ``classes`` (a run's), folder names map to those indices and must all be
    among them. ``by_order`` (foreign weights, whose class names are descriptions such as ImageNet's
    "tench", while the folders are ids such as n01440764): folders none of which is named as a class
    label in their sorted order, when there are as many as classes (or, for weights without class names,
    as ``num_classes``, the model's outputs). Returns (dataset, classes, mean, std)."""
    if data in BUILTIN:
        s = build_splits(data, img_size, root)
        return s.val, s.classes, s.mean, s.std
    path = Path(data).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Data directory {data} {_not_a_folder(path)} (use a folder of class folders, one with "
                                f"val/, or one of {', '.join(BUILTIN)}).")
    if (path / "val").is_dir():
        path = path / "val"
    found = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    use = classes if classes and set(found) <= set(classes) else None
    if classes and use is None:
        unknown = sorted(set(found) - set(classes))
        if len(unknown) < len(found):  # some folders are the checkpoint's classes, some are not
            raise ValueError(f"Folder(s) {unknown[:5]} in {path} are not classes of the checkpoint; name every "
                             f"class folder as one of its classes (e.g. {classes[:3]}) or remove the others.")
        if not by_order:
            raise ValueError(f"No class folder in {path} is named as one of the checkpoint's classes (e.g. "
                             f"{classes[:3]}, found {found[:3]}); name each folder as the class of its images.")
        if len(found) != len(classes):  # none matches: labels would be the folders' sorted order
            raise ValueError(f"No class folder in {path} is named as one of the checkpoint's {len(classes)} classes, "
                             f"so labels would follow the folders' sorted order, which needs all {len(classes)} "
                             f"(found {len(found)}); name the folders as its classes (e.g. {classes[:3]}).")
    if not classes and by_order and num_classes is not None and len(found) != num_classes:
        raise ValueError(f"The checkpoint names no classes, so labels follow the sorted order of the class folders in "
                         f"{path}, which needs one folder for each of its {num_classes} outputs (found {len(found)}); "
                         f"evaluate on a folder holding every class.")
    samples, names = scan_image_folder(path, use)
    return ImageFiles(samples), names, IMAGENET_MEAN, IMAGENET_STD
