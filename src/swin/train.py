"""Training and evaluation: ``TrainConfig`` (+ presets) and a ``Trainer`` whose steps are plain methods.

A run is one directory, ``runs/<name>/``::

    config.yaml      the TrainConfig, reusable with ``swin train --config``
    metrics.jsonl    one JSON object per logged step (loss, lr, img/s) and per evaluation (val top-1/5)
    ckpt-0000123.pt  resumable checkpoints (model, optimizer, scheduler, scaler, EMA, RNG, position)
    best.pt          the weights with the best val top-1
    summary.json     the final numbers

Override ``train_step``, ``forward_loss``, ``prepare_batch`` or ``evaluate`` in a subclass to change
what a step does; there are no callbacks.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import data as D
from .config import SwinConfig, get_config
from .model import SwinTransformer

RUN_FORMAT = "swin-run-1"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the official Swin-T ImageNet-1K recipe; see
    :func:`imagenet`, :func:`finetune` and :func:`small` for the presets and what they reach."""

    # what to train on
    data: str = ""                 # "digits", "cifar10", "cifar100" or a folder with train/ and val/
    data_root: str = "data"        # where CIFAR is (or gets downloaded)
    model: str = "swin_t"
    img_size: int = 0              # 0 = the model's nominal size
    num_classes: int = 0           # 0 = the number of classes in the data
    drop_path: float | None = None  # None = the model table's value
    model_overrides: dict = field(default_factory=dict)  # SwinConfig fields, e.g. {embed_dim: 32} (drop_path_rate,
                                                         # img_size, num_classes: the options of those names)
    pretrained: str = ""           # start from these weights (any format swin.load_checkpoint reads)
    # optimisation
    epochs: int = 300
    warmup_epochs: float = 20.0    # may be a fraction (the warm-up is per step)
    batch_size: int = 1024         # global images per optimizer step, over all processes and accumulation
    lr: float = 5e-4               # per lr_batch images; the peak lr is lr * batch_size / lr_batch
    lr_batch: int = 512
    warmup_lr: float = 5e-7        # scaled like lr
    min_lr: float = 5e-6           # scaled like lr
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0       # layer-wise lr decay (fine-tuning); 1 = off
    clip_grad: float = 5.0         # max grad norm; 0 = off
    accum_steps: int = 1
    # augmentation
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    rand_augment: int = 9          # RandAugment magnitude: timm's rand-m9-mstd0.5-inc1 at 9 (swin.augment); 0 = off
    color_jitter: float = 0.4      # only used when RandAugment is off (as the official pipeline does)
    reprob: float = 0.25           # RandomErasing probability
    mixup: float = 0.8             # MixUp alpha; 0 = off
    cutmix: float = 1.0            # CutMix alpha; 0 = off
    mix_prob: float = 1.0          # probability that a batch is mixed
    switch_prob: float = 0.5       # probability of CutMix when both are on
    label_smoothing: float = 0.1
    eval_crop: float = 0.0         # eval: resize to img_size / eval_crop, centre crop img_size; 0 = the
                                   # official one for the size (0.875; 1.0 at 384 px and up: data.default_eval_crop)
    # model averaging
    ema: bool = False
    ema_decay: float = 0.9998
    # machinery
    amp: str = "auto"              # "auto" (bf16 on GPU, off on CPU), "bf16", "fp16", "off"
    compile: str = "off"           # torch.compile the training forward/backward: "off", "default",
                                   # "reduce-overhead" (CUDA graphs; fastest on GPU: see BENCHMARKS.md);
                                   # on CPU eager is faster (Swin-T b8: compiled 0.81x)
    device: str = "auto"           # "auto", "cpu", "cuda", "cuda:1", ...
    workers: int = 8               # data-loading processes per rank (in-memory data uses none)
    threads: int = 0               # torch CPU threads; 0 = one per idle core (auto_threads)
    seed: int = 0
    out_dir: str = "runs"
    name: str = ""                 # run name; default "<data>-<model>", made unique
    log_every: int = 20            # steps between metrics.jsonl lines
    save_every: int = 0            # steps between extra checkpoints (one is always written per epoch)
    keep_last: int = 3             # step checkpoints kept (best.pt is kept too)
    max_steps: int = 0             # stop after this many steps (the schedule still spans `epochs`); 0 = off
    progress: bool = True          # tqdm bar

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """``base`` (default: the defaults) with the entries of ``d``; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown training option(s) {unknown}; valid options: {sorted(names)}.")
        defaults = cls()
        d = {key: _typed(key, value, getattr(defaults, key)) for key, value in d.items()}
        return replace(base or defaults, **d)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (YAML and ``torch.load(weights_only=True)`` friendly)."""
        d = asdict(self)
        for key in ("betas", "crop_scale"):
            d[key] = list(d[key])
        return d


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the option's default (an int where a float is wanted is fine), or a
    ValueError naming the option: YAML and ``--set`` hand over whatever was typed."""
    def bad(kind: str) -> ValueError:
        return ValueError(f"{key} must be {kind}, got {value!r}.")

    def number(v: Any, kind: str = "a number") -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(kind)
        return float(v)

    if key == "drop_path":  # None = the model table's rate
        return None if value is None else number(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad("a whole number")
        return int(value)
    if isinstance(default, float):
        return number(value)
    if isinstance(default, tuple):  # betas, crop_scale: two numbers
        kind = f"two numbers, e.g. {list(default)}"
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != len(default):
            raise bad(kind)
        return tuple(number(v, kind) for v in value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad("a mapping, e.g. {embed_dim: 32}")
        return dict(value)
    if isinstance(default, str):
        if value is None:  # `--set pretrained=` (YAML's empty value): clear the option
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads `amp: off` as False
            return "off" if value is False else "on"
        if isinstance(value, (int, float)):  # `name: 2024`, a folder named 10
            return str(value)
        if not isinstance(value, str):
            raise bad("a string")
    return value


# option -> (lowest, highest, whether the highest is allowed); checked before any work
_RANGES = {
    "warmup_epochs": (0, math.inf, True), "warmup_lr": (0, math.inf, True), "min_lr": (0, math.inf, True),
    "weight_decay": (0, math.inf, True), "eps": (0, math.inf, True), "clip_grad": (0, math.inf, True),
    "hflip": (0, 1, True), "reprob": (0, 1, True), "mix_prob": (0, 1, True), "switch_prob": (0, 1, True),
    "mixup": (0, math.inf, True), "cutmix": (0, math.inf, True), "label_smoothing": (0, 1, False),
    "ema_decay": (0, 1, False), "rand_augment": (0, 10, True), "color_jitter": (0, math.inf, True),
    "workers": (0, math.inf, True), "threads": (0, math.inf, True), "save_every": (0, math.inf, True),
    "max_steps": (0, math.inf, True), "img_size": (0, math.inf, True), "num_classes": (0, math.inf, True),
    "log_every": (1, math.inf, True),
}


def check_ranges(cfg: TrainConfig) -> None:
    """ValueError naming the first option outside its range (a negative min_lr would train uphill)."""
    for key, (low, high, high_ok) in _RANGES.items():
        value = getattr(cfg, key)
        if not (low <= value <= high and (high_ok or value < high)):
            bound = f"[{low}, {high}{']' if high_ok else ')'}" if high != math.inf else f">= {low}"
            raise ValueError(f"{key} must be {bound if high == math.inf else 'in ' + bound}, got {value}.")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise ValueError(f"drop_path must be in [0, 1), got {cfg.drop_path}.")
    if not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"betas must be in [0, 1), got {cfg.betas}.")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {cfg.crop_scale}.")
    if not 0 <= cfg.eval_crop <= 1:
        raise ValueError(f"eval_crop must be in (0, 1], or 0 for the official one of the image size, got {cfg.eval_crop}.")


def imagenet() -> TrainConfig:
    """The official Swin-T ImageNet-1K recipe (300 epochs, batch 1024, AdamW 1e-3, mixup/cutmix, RandAugment).

    Run:    torchrun --nproc_per_node=8 -m swin train --preset imagenet --data /data/imagenet --model swin_t
    Reaches: 81.2% top-1 (the released Swin-T), 224 px, eval resize 256 + centre crop 224.
    Swin-S/B: add --drop-path 0.3 / 0.5 (the model table already holds these rates).
    """
    return TrainConfig()


def finetune() -> TrainConfig:
    """Fine-tune a pre-trained model, e.g. Swin-B 224 -> 384 (the official 30-epoch recipe,
    ``swin_base_patch4_window12_384_finetune.yaml``: drop path 0.5, evaluated without a crop at 384).

    Run:    swin train --preset finetune --model swin_b_384 --pretrained swin_base_patch4_window7_224.pth \\
                --data /data/imagenet --batch-size 512
    Reaches: 84.5% top-1 (the released Swin-B 384). From ImageNet-22K weights the official configs use
    --drop-path 0.2 instead. --layer-decay 0.9 turns on layer-wise lr decay.
    """
    return TrainConfig(epochs=30, warmup_epochs=5, lr=2e-5, warmup_lr=2e-8, min_lr=2e-7, weight_decay=1e-8,
                       model="swin_b_384", batch_size=512, drop_path=0.5)


def small() -> TrainConfig:
    """Small images from scratch: the embedded digits default (and a CIFAR starting point).

    Run:    swin train            (= swin train --preset small --data digits)
    Reaches: 98.3% val top-1 on scikit-learn's digits (360 val images; >= 95% from epoch 6) in 1.1 min of
             training, 1.4 min for all of `make demo`, on 2 shared CPU cores (load average ~4).
    For CIFAR: swin train --data cifar10 --epochs 100 --set hflip=0.5 --set rand_augment=9 --set mixup=0.8
    """
    return TrainConfig(data="digits", model="swin_micro_p4", epochs=20, warmup_epochs=1, batch_size=64, lr=4e-3,
                       warmup_lr=1e-5, min_lr=1e-5, weight_decay=0.05, drop_path=0.0, crop_scale=(0.6, 1.0),
                       hflip=0.0, rand_augment=0, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0,
                       label_smoothing=0.1, eval_crop=1.0, workers=2, log_every=5)


PRESETS: dict[str, Callable[[], TrainConfig]] = {"imagenet": imagenet, "finetune": finetune, "small": small}


# ---------------------------------------------------------------------------------------------
# Small pieces: schedule, parameter groups, EMA, files
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, warmup: int, peak: float, start: float, end: float) -> float:
    """Per-step linear warm-up from ``start`` to ``peak``, then cosine down to ``end`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * t))


def param_groups(model: SwinTransformer, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters, biases and the model's no-decay keywords
    (relative_position_bias_table, absolute_pos_embed, V2 logit_scale and cpb_mlp); with
    ``layer_decay < 1`` block b of L gets lr * layer_decay ** (L + 1 - b) (stem 0, head L + 1)."""
    skip = model.no_weight_decay_keywords()
    depths = model.config.depths
    top = sum(depths) + 1

    def layer_id(name: str) -> int:
        if name.startswith("patch_embed") or name.startswith("absolute_pos_embed"):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            i = int(parts[1])
            if parts[2] == "blocks":
                return sum(depths[:i]) + int(parts[3]) + 1
            return sum(depths[: i + 1])  # downsample at the end of stage i
        return top

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in skip)
        lid = layer_id(name) if layer_decay != 1.0 else top
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (top - lid), "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (buffers copied), kept on the same device."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m.detach(), 1.0 - self.decay)
            else:
                e.copy_(m)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The resumable checkpoint with the highest step in ``run_dir`` (None when there is none)."""
    ckpts = sorted(Path(run_dir).glob("ckpt-*.pt"))
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    """The step in a ``ckpt-<step>.pt`` name."""
    return int(path.stem.split("-")[-1])


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl. Only its last line may be cut off (a run still writing, or
    killed mid-line): it is left out; a damaged line before it is a ValueError."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not valid JSON; the file is damaged (remove that line "
                                 "to go on).") from None
    return rows


def run_weights(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that stands for a run folder's model: best.pt, else the latest ckpt-*.pt (None: neither)."""
    best = Path(run_dir) / "best.pt"
    return best if best.is_file() else latest_checkpoint(run_dir)


def resolve_resume(path: str | os.PathLike) -> Path:
    """``--resume`` takes a run folder (its latest checkpoint) or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"Run folder {p} has no checkpoint (ckpt-*.pt) to resume from.")
        return ckpt
    if not p.is_file():
        raise FileNotFoundError(f"Nothing to resume at {p}: give a run folder or a ckpt-*.pt file.")
    return p


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x: Any) -> Any:
    """Tuples -> lists, recursively (model configs in checkpoints and YAML)."""
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def model_config_from_dict(d: dict) -> SwinConfig:
    d = dict(d)
    for k in ("img_size", "depths", "num_heads", "pretrained_window_sizes"):
        if k in d:
            d[k] = tuple(d[k])
    return SwinConfig(**d).validate()


def check_img_size(img_size: int, config: SwinConfig, name: str = "the model") -> None:
    """One clear sentence when ``img_size`` is not a size that ``config`` can take."""
    least = config.patch_size * 2 ** (config.num_layers - 1)
    if not isinstance(img_size, int) or img_size < least:
        raise ValueError(f"Image size {img_size} is too small for {name}: it needs at least {least} pixels "
                         f"(patch {config.patch_size}, then {config.num_layers - 1} 2x patch mergings).")


def check_labels(num_data_classes: int, num_model_classes: int, what: str = "the model") -> None:
    if num_data_classes > num_model_classes:
        raise ValueError(f"The data has {num_data_classes} classes but {what} predicts {num_model_classes}: "
                         f"labels {num_model_classes}..{num_data_classes - 1} would be out of range.")


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

def init_distributed(device: str) -> tuple[int, int, int]:
    """(world, rank, local_rank); starts the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return 1, 0, 0


def auto_threads() -> int:
    """CPU threads for torch: the idle cores (cores minus the 1-minute load average), at least 1.

    OpenMP threads spin-wait for each other, so on a busy machine one thread per *idle* core is
    several times faster than one per core. OMP_NUM_THREADS (torchrun sets it) wins when set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), int(idle + 0.5)))


def file_on_path(path: Path, itself: bool = False) -> Path | None:
    """The first of ``path``'s parent folders (and ``path`` itself with ``itself``) that is a file, which
    would stop a folder from being made there; None if there is none."""
    return next((p for p in ((path,) if itself else ()) + tuple(path.parents) if p.exists() and not p.is_dir()), None)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"Device {device} was asked for but no CUDA GPU is available; use --device cpu.")
    if dist.is_initialized():  # torchrun: each process takes the GPU of its local rank
        if dev.index is not None:
            raise ValueError(f"Under torchrun each process uses the GPU of its local rank, so --device {device} "
                             "would put them all on one; use --device cuda.")
        return torch.device(f"cuda:{local_rank}")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"Device {device} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to "
                         f"cuda:{count - 1}.")
    return dev


# ---------------------------------------------------------------------------------------------
# Compiling the training step
# ---------------------------------------------------------------------------------------------

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compiled_for_training(net: nn.Module, mode: str, world: int = 1, accum_steps: int = 1) -> nn.Module:
    """``net`` itself ("off") or ``torch.compile(net, mode=...)`` for the training forward and its
    backward; checkpoints, EMA and evaluation keep using the plain module (same parameters).
    "reduce-overhead" and "max-autotune" replay the compiled graphs as CUDA graphs: one process, no
    accumulation, since a replay reuses the memory the previous micro-batch's gradients would still be in."""
    check_compile(mode, world, accum_steps)
    if mode == "off":
        return net
    return torch.compile(net, mode=None if mode == "default" else mode)


def check_compile(mode: str, world: int = 1, accum_steps: int = 1) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}.")
    if mode in ("reduce-overhead", "max-autotune") and (world > 1 or accum_steps > 1):
        raise ValueError(f"compile={mode} needs one process and accum_steps=1 (CUDA graphs reuse their memory on "
                         "every replay); use compile=default with several GPUs or accumulation.")


# ---------------------------------------------------------------------------------------------
# Evaluation (shared by the Trainer and `swin eval`)
# ---------------------------------------------------------------------------------------------

def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be auto, bf16, fp16 or off; got {amp!r}.")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: torch.device | str = "cpu",
             workers: int = 0, amp: torch.dtype | None = None, world: int = 1, rank: int = 0,
             on_skip: Callable[[list[str]], None] | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%), mean cross-entropy and img/s of ``model`` on ``dataset``
    (a :class:`swin.data.Transformed`). Under torch.distributed each rank takes a shard and the
    sums are reduced, so the numbers are those of the whole set."""
    device = torch.device(device)
    was_training = model.training
    model.eval()  # dropout and drop path off
    sampler = D.ShardSampler(len(dataset), world, rank, shuffle=False, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=D.collate_skip, worker_init_fn=D.worker_init if workers else None,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1, top-5, count
    t0 = time.perf_counter()
    for x, y, skipped in loader:
        if skipped and on_skip is not None:
            on_skip(skipped)
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), hit[:, 0].sum().item(),
                              hit.any(dim=1).sum().item(), len(y)], dtype=torch.float64)
    if world > 1:
        sums = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(sums)
        sums = sums.cpu()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "loss": sums[0].item() / n,
            "img_s": sums[3].item() / max(seconds, 1e-9), "images": int(sums[3].item())}


# ---------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------

class Trainer:
    """One training run. ``Trainer(cfg).fit()`` trains, evaluates every epoch and checkpoints;
    ``Trainer(cfg, resume=run_dir_or_ckpt).fit()`` continues a run exactly where it stopped."""

    def __init__(self, cfg: TrainConfig, *, resume: str | os.PathLike | None = None):
        resume_path = resolve_resume(resume) if resume else None
        # -- everything a user can get wrong is checked before any work --------------------------
        if not cfg.data:
            raise ValueError("No data given: use --data digits|cifar10|cifar100|DIR (DIR with train/ and val/).")
        if resume_path is None:  # the run records absolute paths: its config.yaml and `swin eval RUN` work from any folder
            cfg = replace(cfg, data=D.absolute_data(cfg.data), data_root=D.absolute_path(cfg.data_root),
                          pretrained=cfg.pretrained and D.absolute_path(cfg.pretrained))
        self.cfg = cfg
        for key in ("epochs", "batch_size", "accum_steps", "lr_batch", "keep_last"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}.")
        if cfg.lr <= 0:
            raise ValueError(f"lr must be positive, got {cfg.lr}.")
        if not 0 < cfg.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}.")
        if cfg.warmup_epochs > cfg.epochs:
            raise ValueError(f"warmup_epochs {cfg.warmup_epochs:g} is more than epochs {cfg.epochs}: the lr would never "
                             "reach its peak nor decay; pass --warmup-epochs (e.g. a tenth of the epochs).")
        check_ranges(cfg)
        for key, flag in (("drop_path_rate", "--drop-path"), ("img_size", "--img-size"), ("num_classes", "--num-classes")):
            if key in cfg.model_overrides:  # training options of their own: the data pipeline reads them too
                raise ValueError(f"model_overrides cannot set {key}: use {flag} (the training option {flag[2:].replace('-', '_')}).")
        if resume_path is None:
            out_dir = Path(cfg.out_dir).expanduser().absolute()
            blocking = file_on_path(out_dir, itself=True)
            if blocking is not None:
                raise ValueError(f"out_dir {cfg.out_dir} cannot be a folder: {blocking} is a file; give a folder "
                                 "for the runs.")
            if int(os.environ.get("RANK", "0")) == 0:  # made now, so that a folder nobody may write is said before any work
                try:
                    out_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ValueError(f"out_dir {cfg.out_dir} cannot be created ({e.strerror}); give a folder you can "
                                     "write to.") from None
        model_cfg = get_config(cfg.model, img_size=cfg.img_size or None, drop_path_rate=cfg.drop_path,
                               **cfg.model_overrides)
        self.img_size = cfg.img_size or model_cfg.img_size[0]
        check_img_size(self.img_size, model_cfg, cfg.model)
        self.world, self.rank, local_rank = init_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.device = pick_device(cfg.device, local_rank)
        self.amp = amp_dtype(cfg.amp, self.device)
        check_compile(cfg.compile, self.world, cfg.accum_steps)
        micro = cfg.batch_size // (self.world * cfg.accum_steps)
        if micro * self.world * cfg.accum_steps != cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps "
                             f"({self.world} x {cfg.accum_steps}).")
        self.micro_batch = micro
        if self.device.type == "cpu":
            self.threads = cfg.threads or auto_threads()
            torch.set_num_threads(self.threads)

        self.splits = D.build_splits(cfg.data, self.img_size, cfg.data_root)
        self.classes = self.splits.classes
        num_classes = cfg.num_classes or len(self.classes)
        check_labels(len(self.classes), num_classes, f"num_classes={num_classes}")
        self.sampler = D.ShardSampler(len(self.splits.train), self.world, self.rank, shuffle=True, seed=cfg.seed)
        self.steps_per_epoch = len(self.sampler) // (micro * cfg.accum_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(self.splits.train)} training "
                             "images; use a smaller --batch-size.")
        self.total_steps = self.steps_per_epoch * cfg.epochs

        # -- model, optimizer, schedule ------------------------------------------------------------
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model_config = replace(model_cfg, num_classes=num_classes)
        self.model = SwinTransformer(self.model_config).to(self.device)
        if cfg.pretrained and resume_path is None:  # a resumed run's own weights replace them: not read
            from . import load_checkpoint

            source = Path(cfg.pretrained)
            if source.is_dir():  # a run folder stands for its best.pt (a transformers folder for itself)
                source = run_weights(source) or source
            load_checkpoint(self.model, source, strict=True)
        self.ddp, self.finished = None, False
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_net = compiled_for_training(self.ddp or self.model, cfg.compile, self.world, cfg.accum_steps)
        if self.rank:
            torch.manual_seed(cfg.seed + self.rank)  # each rank its own drop-path draws
        scale = cfg.batch_size / cfg.lr_batch
        self.peak_lr = cfg.lr * scale
        groups = param_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        for g in groups:
            g["lr"] = self.peak_lr * g["lr_scale"]
        fused = self.device.type in ("cuda", "cpu")  # one kernel per step; on CPU 3x faster than foreach
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           fused=fused)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        peak, start, end = self.peak_lr, cfg.warmup_lr * scale, cfg.min_lr * scale
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.total_steps, warmup, peak, start, end) / peak)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema else None
        self.mix = D.batch_mix(num_classes, cfg.mixup, cfg.cutmix, cfg.switch_prob)

        mean, std = self.splits.mean, self.splits.std
        self.train_set = D.Transformed(self.splits.train, D.train_transform(
            self.img_size, mean, std, crop_scale=cfg.crop_scale, hflip=cfg.hflip, rand_augment=cfg.rand_augment,
            color_jitter=cfg.color_jitter, reprob=cfg.reprob), seed=cfg.seed)
        self.eval_crop = cfg.eval_crop or D.default_eval_crop(self.img_size)
        self.val_set = D.Transformed(self.splits.val, D.eval_transform(self.img_size, mean, std, self.eval_crop))
        self.workers = 0 if self.splits.in_memory else cfg.workers

        # -- position and bookkeeping --------------------------------------------------------------
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_top1 = -1.0
        self.skipped: set[str] = set()
        self.last_val: dict[str, float] = {}
        self.stop_signal: int | None = None
        self.train_seconds = 0.0
        self.run_dir = self._make_run_dir(resume_path)
        if resume_path is not None:
            self.load_state(resume_path)
        elif self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", _yaml(cfg.to_dict()))

    # -- printing and files --------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _make_run_dir(self, resume_path: Path | None) -> Path:
        if resume_path is not None:
            return resume_path.parent
        name = [None]
        if self.is_main:
            base = Path(self.cfg.out_dir) / (self.cfg.name or f"{self.splits.name}-{self.cfg.model}")
            path, n = base, 1
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
                while True:  # never reuse a folder: a second run gets "<name>-2", ...
                    try:
                        path.mkdir()
                        break
                    except FileExistsError:
                        n += 1
                        path = base.with_name(f"{base.name}-{n}")
            except OSError as e:
                raise ValueError(f"The run folder {path} cannot be created ({e.strerror}); give --out-dir a folder "
                                 "you can write to.") from None
            name[0] = str(path)
        if self.world > 1:
            dist.broadcast_object_list(name, src=0)
        return Path(name[0])

    def write_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly; plain types and tensors only (weights_only loading)."""
        return {
            "format": RUN_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None, "rng": _rng_state(),
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "best_top1": self.best_top1, "val": dict(self.last_val), "skipped": sorted(self.skipped),
            "train_seconds": self.train_seconds, "config": self.cfg.to_dict(), "model_name": self.cfg.model,
            "model_config": _plain(asdict(self.model_config)), "classes": list(self.classes),
        }

    def save_checkpoint(self) -> Path:
        """Called on every rank: each rank's random state goes in (its own drop-path draws)."""
        path = self.run_dir / f"ckpt-{self.step:07d}.pt"
        ranks: list | None = None
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, _rng_state())
        if self.is_main:
            state = self.state_dict()
            if ranks is not None:
                state["rng_ranks"] = ranks
            atomic_save(state, path)
            for old in sorted(self.run_dir.glob("ckpt-*.pt"))[: -self.cfg.keep_last]:
                old.unlink()
        return path

    def save_best(self) -> None:
        if self.is_main:
            state = {k: v for k, v in self.state_dict().items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
            atomic_save(state, self.run_dir / "best.pt")

    def load_state(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != RUN_FORMAT or "optimizer" not in ckpt:
            raise ValueError(f"{path} is not a resumable swin run checkpoint (ckpt-*.pt).")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit the model of this config ({self.cfg.model}): "
                             f"{str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self.best_top1, self.skipped = ckpt["best_top1"], set(ckpt["skipped"])
        self.last_val = dict(ckpt.get("val") or {})  # the last epoch's metrics, for summary.json
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            _set_rng_state(ranks[self.rank])
        elif self.rank == 0:
            _set_rng_state(ckpt["rng"])
        else:  # a checkpoint of one process resumed by several (or of older code): a fresh seed per rank
            torch.manual_seed(self.cfg.seed + self.rank + 7919 * self.step)
        if self.is_main:
            self._set_aside_later()
        self.log(f"Resumed {self.run_dir} from {path.name}: epoch {self.epoch}, step {self.step}.")

    def _set_aside_later(self) -> None:
        """What the run wrote after the step it resumes from (a killed run got further; or an older
        ckpt-*.pt was named, abandoning a branch) would mix with what it writes now: those metrics lines,
        checkpoints and a later best.pt move to ``after-step-<step>/`` in the run folder. Nothing is deleted."""
        moved: list[Path] = [p for p in self.run_dir.glob("ckpt-*.pt") if checkpoint_step(p) > self.step]
        best = self.run_dir / "best.pt"
        if best.is_file() and torch.load(best, map_location="cpu", weights_only=True, mmap=True).get("step", 0) > self.step:
            moved.append(best)
        mpath = self.run_dir / "metrics.jsonl"
        rows = read_metrics(mpath) if mpath.is_file() else []
        later = [r for r in rows if r.get("step", 0) > self.step]
        if moved or later:  # set aside first: a crash in between loses nothing
            aside = self.run_dir / f"after-step-{self.step:07d}"
            n = 1
            while aside.exists():
                n += 1
                aside = self.run_dir / f"after-step-{self.step:07d}-{n}"
            aside.mkdir()
            if later:
                atomic_write_text(aside / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in later))
            for p in moved:
                os.replace(p, aside / p.name)
        if mpath.is_file():  # up to this step (a line cut off by a kill goes too)
            atomic_write_text(mpath, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= self.step))
        if moved or later:
            what = [f"{len(later)} metrics line(s)"] * bool(later) + [p.name for p in moved]
            self.log(f"The run had gone past step {self.step}: {', '.join(what)} moved to {aside}.")

    # -- one step -------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """To the device; MixUp/CutMix with label smoothing (soft targets) when on."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mix is None:
            return x, y
        with torch.random.fork_rng(devices=[]):  # mixing is a function of (seed, step, rank, micro-batch)
            # the CPU generator only (torchvision's MixUp/CutMix draw from it): the CUDA one is the model's
            torch.default_generator.manual_seed(D.mix_seed(self.cfg.seed, self.step, self.rank, micro))
            if torch.rand(()).item() >= self.cfg.mix_prob:
                return x, y
            x, y = self.mix(x, y)
        ls = self.cfg.label_smoothing
        return x, y * (1 - ls) + ls / y.shape[1]

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing (hard targets) or soft-target cross-entropy (mixed)."""
        with self.autocast():
            logits = self.train_net(x)
        logits = logits.float()
        if y.ndim == 2:
            return torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One optimizer step over ``accum_steps`` micro-batches; returns the mean loss."""
        self.model.train()
        net = self.ddp or self.model
        # the mean over every readable image of the global batch: each rank weighs its micro-batch by its
        # share of the images of all ranks (DDP then averages the ranks' gradients: hence x world)
        n = self._reduce_sum(float(sum(len(y) for _, y in micro_batches)))
        total = 0.0
        for i, (x, y) in enumerate(micro_batches):
            weight = len(y) * self.world / n if n else 0.0
            if len(y) == 0:  # every image unreadable: a zero-weighted stand-in, so that every rank still
                x = torch.zeros(1, 3, self.img_size, self.img_size)  # takes part in DDP's all-reduce
                y = torch.zeros(1, dtype=torch.int64)
            x, y = self.prepare_batch(x, y, i)
            last = i == len(micro_batches) - 1
            with net.no_sync() if (self.ddp is not None and not last) else nullcontext():
                loss = self.forward_loss(x, y)
                value = self._reduce_sum(loss.detach() * weight) / self.world
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"The loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}); the run "
                        f"stopped before updating the weights. Last good checkpoint: {self._last_ckpt_text()}. "
                        "Try a lower --lr or --amp bf16/off.")
                self.scaler.scale(loss * weight).backward()
            total += value
        if n:
            if self.cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return total

    def _reduce_sum(self, t: torch.Tensor | float) -> float:
        """The sum over ranks (the value itself in one process)."""
        if self.world == 1:
            return float(t)
        t = torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else t.dtype)
        t = t.to(self.device).clone() if dist.get_backend() == "nccl" else t.cpu().clone()
        dist.all_reduce(t)
        return t.item()

    def _last_ckpt_text(self) -> str:
        ckpt = latest_checkpoint(self.run_dir)
        return str(ckpt) if ckpt else "none yet"

    # -- loops ----------------------------------------------------------------------------------
    def make_loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * self.micro_batch * self.cfg.accum_steps)
        self.train_set.set_epoch(self.epoch)
        return DataLoader(self.train_set, batch_size=self.micro_batch, sampler=self.sampler, drop_last=True,
                          num_workers=self.workers, collate_fn=D.collate_skip,
                          worker_init_fn=D.worker_init if self.workers else None,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator())

    def note_skipped(self, paths: list[str]) -> None:
        for p in paths:
            if p not in self.skipped:
                self.skipped.add(str(p))  # the path alone (summary.json, the checkpoint)
                if self.is_main:
                    print(f"warning: skipped unreadable image {D.describe_skip(p)}", file=sys.stderr, flush=True)

    def train_epoch(self) -> str | None:
        """Train until the end of the epoch; returns why it stopped early ("interrupted", "max_steps")."""
        from tqdm import tqdm

        cfg = self.cfg
        batches = iter(self.make_loader())
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (self.is_main and cfg.progress and sys.stderr.isatty()),  # no frames into logs
                   leave=False, dynamic_ncols=True, file=sys.stderr)
        t_log, images = time.perf_counter(), 0
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                t0 = time.perf_counter()
                micro = []
                for _ in range(cfg.accum_steps):
                    x, y, skipped = next(batches)
                    self.note_skipped(skipped)
                    micro.append((x, y))
                lr = max(g["lr"] for g in self.optimizer.param_groups)  # the lr this step trains at
                loss = self.train_step(micro)
                self.step += 1
                self.step_in_epoch += 1
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                images += sum(len(y) for _, y in micro) * self.world
                speed = images / max(time.perf_counter() - t_log, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    now = time.perf_counter()
                    epoch = round(self.epoch + self.step_in_epoch / self.steps_per_epoch, 4)
                    self.write_metrics({"step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                                        "img_s": round(images / max(now - t_log, 1e-9), 2)})
                    t_log, images = now, 0
                if self._should_stop():
                    self.save_checkpoint()
                    return "interrupted"
                if cfg.max_steps and self.step >= cfg.max_steps and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
                    return "max_steps"  # (at the epoch's last step the epoch ends first: evaluated, saved)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
        finally:
            bar.close()
        return None

    def _should_stop(self) -> bool:
        flag = self.stop_signal is not None
        if self.world > 1:  # all ranks stop at the same step
            t = torch.tensor([float(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            flag = t.item() > 0
        return flag

    def evaluate(self) -> dict[str, float]:
        """Val metrics of the model (and of the EMA weights as ``ema_*``)."""
        kw = dict(batch_size=max(self.micro_batch, 64), device=self.device, workers=self.workers, amp=self.amp,
                  world=self.world, rank=self.rank, on_skip=self.note_skipped)
        metrics = evaluate(self.model, self.val_set, **kw)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(self.ema.module, self.val_set, **kw).items()})
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to the end (or until stopped); returns the summary also written to summary.json."""
        cfg = self.cfg
        # a resumed run that had already finished, or reached its --max-steps: its results stay as they are
        if self.epoch >= cfg.epochs:
            return self._nothing_to_do(f"has already trained its {cfg.epochs} epochs", "--epochs N with a larger N",
                                       {"status": "finished", "epochs_done": self.epoch})
        if cfg.max_steps and self.step >= cfg.max_steps:
            return self._nothing_to_do(f"is at step {self.step}, already at --max-steps {cfg.max_steps}",
                                       "--max-steps 0, or a larger number,", {"status": "max_steps", "step": self.step})
        threads = f" ({self.threads} threads)" if self.device.type == "cpu" else ""
        self.log(f"Training {cfg.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params) on "
                 f"{self.splits.name}: {len(self.splits.train)} train / {len(self.splits.val)} val images, "
                 f"{len(self.classes)} classes, {self.img_size}px, {cfg.epochs} epochs x {self.steps_per_epoch} steps "
                 f"of {cfg.batch_size}, {self.world} process(es) on {self.device}{threads}. Run: {self.run_dir}")
        status = "finished"
        old = self._install_signal_handlers()
        try:
            while self.epoch < cfg.epochs:
                t0 = time.perf_counter()
                stopped = self.train_epoch()
                if stopped:
                    status = stopped
                    break
                self.last_val = self.evaluate()
                self.epoch += 1
                self.step_in_epoch = 0
                v = self.last_val
                record = {"step": self.step, "epoch": self.epoch, **{f"val_{k}": v[k] for k in v}}
                self.write_metrics(record)
                ema = f", EMA {v['ema_top1']:.2f}%" if "ema_top1" in v else ""
                self.log(f"epoch {self.epoch}/{cfg.epochs}: val top-1 {v['top1']:.2f}%, top-5 {v['top5']:.2f}%, "
                         f"loss {v['loss']:.4f}{ema} ({time.perf_counter() - t0:.1f} s)")
                if v["top1"] > self.best_top1:
                    self.best_top1 = v["top1"]
                    self.save_best()
                self.save_checkpoint()
                if self._should_stop():
                    status = "interrupted"
                    break
                if cfg.max_steps and self.step >= cfg.max_steps and self.epoch < cfg.epochs:
                    status = "max_steps"
                    break
        except NonFiniteLossError:  # summary.json says so too (the error itself is the caller's to print)
            self.finish("non_finite")
            raise
        finally:
            self._restore_signal_handlers(old)
        return self.finish(status)

    def _nothing_to_do(self, why: str, flags: str, fallback: dict) -> dict[str, Any]:
        self.log(f"{self.run_dir} {why}; nothing to do (--resume {self.run_dir} {flags} trains on).")
        self.finished = True
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else fallback

    def finish(self, status: str) -> dict[str, Any]:
        self.finished = True  # every rank gets here (stops are agreed on): close() may wait for the others
        v = self.last_val
        if self.world > 1:  # each rank saw its own shard's unreadable files
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, sorted(self.skipped))
            self.skipped = set().union(*everyone)
        summary = {"status": status, "run_dir": str(self.run_dir), "model": self.cfg.model, "data": self.splits.name,
                   "epochs_done": self.epoch, "step": self.step, "val_top1": v.get("top1"), "val_top5": v.get("top5"),
                   "val_loss": v.get("loss"), "ema_top1": v.get("ema_top1"),
                   "best_top1": self.best_top1 if self.best_top1 >= 0 else None,
                   "train_minutes": round(self.train_seconds / 60, 3), "skipped_images": len(self.skipped),
                   "skipped_files": sorted(self.skipped)[:100], "world_size": self.world, "device": str(self.device)}
        if self.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        skipped = f" Skipped {len(self.skipped)} unreadable image(s) (listed in summary.json)." if self.skipped else ""
        if status == "finished":
            self.log(f"Done: {self.epoch} epochs in {self.train_seconds / 60:.1f} min of training; val top-1 "
                     f"{v.get('top1', float('nan')):.2f}%, top-5 {v.get('top5', float('nan')):.2f}% "
                     f"(best {self.best_top1:.2f}%).{skipped} Run saved to {self.run_dir}")
        elif status == "non_finite":
            pass  # NonFiniteLossError names the step and the last good checkpoint
        elif status == "interrupted":
            self.log(f"Stopped by {signal.Signals(self.stop_signal).name if self.stop_signal else 'a signal'} at step "
                     f"{self.step}; checkpoint saved to {latest_checkpoint(self.run_dir)}.{skipped} "
                     f"Continue with: swin train --resume {self.run_dir}")
        else:
            self.log(f"Stopped at --max-steps {self.cfg.max_steps} (step {self.step}); checkpoint saved to "
                     f"{latest_checkpoint(self.run_dir)}.{skipped} Continue with: swin train --resume {self.run_dir} "
                     "--max-steps 0")
        return summary

    # -- signals ----------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.log(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving.")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for s, h in old.items():
            signal.signal(s, h)

    def close(self) -> None:
        """Leave the process group. After a normal finish every rank first waits at a barrier for the
        others' last collectives; the DDP wrapper is dropped (its reducer holds the group) so that
        destroying the group joins gloo's threads now: left to interpreter shutdown, a rank under
        load could abort ("terminate called without an active exception")."""
        if self.world > 1 and dist.is_initialized():
            if self.finished:
                dist.barrier()
            self.ddp = self.train_net = None
            dist.destroy_process_group()


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading a trained model (eval, predict)
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: SwinTransformer
    classes: list[str] | None   # None: a foreign checkpoint that does not name its classes
    img_size: int
    eval_crop: float
    mean: tuple
    std: tuple
    source: str                 # "run" or the foreign format


def load_for_inference(checkpoint: str | os.PathLike, *, model: str | None = None, img_size: int | None = None,
                       use_ema: bool = False) -> LoadedModel:
    """A model ready for eval from a run folder (its best.pt, else latest ckpt), one of our checkpoints,
    or any checkpoint :func:`swin.load_checkpoint` reads (then ``model`` names the architecture)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = run_weights(path)
        if path is None:
            from .convert import HF_WEIGHT_FILES, folder_checkpoint

            if not any((Path(checkpoint) / name).is_file() for name in HF_WEIGHT_FILES):
                raise FileNotFoundError(f"Folder {checkpoint} has no best.pt or ckpt-*.pt (a run) and no "
                                        f"{' or '.join(HF_WEIGHT_FILES)} (a transformers model).")
            path = folder_checkpoint(Path(checkpoint))
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    ours = obj = None
    if path.suffix != ".safetensors":
        from .convert import read_file

        obj = read_file(path)
        if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
            ours = obj
    if ours is not None:
        if model and model != ours.get("model_name", model):
            raise ValueError(f"{path} is a run of {ours['model_name']}, not {model}; leave out --model (a run "
                             "checkpoint names its own architecture).")
        if use_ema and ours.get("ema") is None:
            raise ValueError(f"{path} has no EMA weights (the run was trained without --ema); leave out --ema.")
        mcfg = model_config_from_dict(ours["model_config"])
        net = SwinTransformer(mcfg)
        weights = ours["ema"] if use_ema else ours["model"]
        net.load_state_dict(weights)
        rc = ours.get("config", {})
        data = rc.get("data", "")
        mean, std = (D.DIGITS_MEAN, D.DIGITS_STD) if data == "digits" else (D.IMAGENET_MEAN, D.IMAGENET_STD)
        size = img_size if img_size is not None else rc.get("img_size") or mcfg.img_size[0]
        check_img_size(size, mcfg, ours.get("model_name", "the model"))
        crop = rc.get("eval_crop") or D.default_eval_crop(size)
        return LoadedModel(net.eval(), list(ours["classes"]), size, crop, mean, std, "run")
    if not model:
        raise ValueError(f"{path} is not a swin run checkpoint; pass --model NAME to say which architecture it holds "
                         "(see swin.list_models()).")
    from . import load_checkpoint

    sd = read_state_dict(path, obj)  # (a pickle already read above is not read again)
    classes = _head_classes(sd)
    if classes is None:
        raise ValueError(f"{path} has no classifier head (a backbone checkpoint), so it cannot classify; "
                         f"fine-tune a head first: swin train --pretrained {path} --model {model} --data ...")
    mcfg = get_config(model, num_classes=classes)
    net = SwinTransformer(mcfg)
    load_checkpoint(net, sd, strict=True, source=checkpoint)  # a transformers folder: its config.json too
    size = img_size if img_size is not None else mcfg.img_size[0]
    check_img_size(size, mcfg, model)
    classes = imagenet_classes() if mcfg.num_classes == 1000 else None
    return LoadedModel(net.eval(), classes, size, D.default_eval_crop(size), D.IMAGENET_MEAN, D.IMAGENET_STD,
                       "foreign")


def run_config(obj: Any) -> SwinConfig | None:
    """The model config a swin run checkpoint (as read, :func:`swin.convert.read_file`) records; None
    for any other checkpoint."""
    if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT and "model_config" in obj:
        return model_config_from_dict(obj["model_config"])
    return None


def read_state_dict(path: str | os.PathLike, obj: Any = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a torch checkpoint (unwrapped from "model"/"state_dict");
    ``obj``: the file's content when already read."""
    from .convert import _unwrap, read_checkpoint

    sd = read_checkpoint(path) if obj is None else _unwrap(obj)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors).")
    return sd


def _head_classes(sd: dict) -> int | None:
    """The number of classes of a state dict's classifier, whatever its key scheme (None: no head)."""
    from .convert import convert_state_dict

    head = convert_state_dict(sd).get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1K class names in index order (shipped with the package)."""
    from importlib.resources import files

    return files("swin").joinpath("imagenet_classes.txt").read_text().splitlines()
