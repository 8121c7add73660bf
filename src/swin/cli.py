"""The ``swin`` command line: train, eval, predict, flops, convert, export, plot, models, bench.

Errors a user can cause print one line, ``error: ...``, and exit with status 2 (no traceback;
SWIN_DEBUG=1 shows it). A run stopped by SIGINT/SIGTERM saves and exits 0; a non-finite loss exits 1.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

_TRAIN_FLAGS: list[tuple[str, type, str]] = [
    # flag, type, help; the destination is the TrainConfig field of the same name
    ("--data", str, "digits (default), cifar10, cifar100, or a folder with train/ and val/ class folders"),
    ("--data-root", str, "where CIFAR is stored or downloaded (default ./data)"),
    ("--model", str, "a registered model name (swin models lists them)"),
    ("--img-size", int, "training resolution (default: the model's)"),
    ("--num-classes", int, "classifier size (default: the classes in the data)"),
    ("--epochs", int, "epochs"),
    ("--batch-size", int, "global images per optimizer step (over all processes and accumulation)"),
    ("--lr", float, "base lr per --lr-batch images (linearly scaled to --batch-size)"),
    ("--lr-batch", int, "the batch size --lr refers to (512 in the official recipe)"),
    ("--min-lr", float, "cosine end lr (scaled like --lr)"),
    ("--warmup-lr", float, "warm-up start lr (scaled like --lr)"),
    ("--warmup-epochs", float, "linear warm-up epochs (per-step)"),
    ("--weight-decay", float, "AdamW weight decay (none on norms, biases, position tables)"),
    ("--layer-decay", float, "layer-wise lr decay for fine-tuning (1 = off)"),
    ("--clip-grad", float, "max gradient norm (0 = off)"),
    ("--accum-steps", int, "gradient accumulation micro-batches per step"),
    ("--drop-path", float, "stochastic depth rate (default: the model's)"),
    ("--mixup", float, "MixUp alpha (0 = off)"),
    ("--cutmix", float, "CutMix alpha (0 = off)"),
    ("--label-smoothing", float, "label smoothing"),
    ("--ema-decay", float, "EMA decay (with --ema)"),
    ("--pretrained", str, "start from these weights (our runs, official, timm, torchvision, HF, mmdet)"),
    ("--amp", str, "auto (bf16 on GPU), bf16, fp16 or off"),
    ("--compile", str, "torch.compile the training step: off (default), default, reduce-overhead (CUDA graphs; "
                       "fastest on GPU), max-autotune. On CPU eager is faster (Swin-T: compiled 0.81x)"),
    ("--device", str, "auto, cpu, cuda, cuda:N"),
    ("--workers", int, "data-loading processes per rank"),
    ("--threads", int, "CPU threads (default: the idle cores)"),
    ("--seed", int, "random seed"),
    ("--name", str, "run name (default <data>-<model>; a new name if runs/<name> exists)"),
    ("--out-dir", str, "where runs go (default ./runs)"),
    ("--log-every", int, "steps between metrics.jsonl lines"),
    ("--save-every", int, "steps between extra checkpoints (one per epoch always)"),
    ("--keep-last", int, "step checkpoints to keep"),
    ("--max-steps", int, "stop after this many steps (the schedule still spans --epochs)"),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swin", description="Swin Transformer V1/V2: train, evaluate, predict, convert.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train or fine-tune (no arguments: the digits demo)",
                       description="Train a Swin model. With no arguments: swin_micro_p4 on the bundled digits. "
                                   "Precedence: preset < --config file < --set < flags. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m swin train ...")
    t.add_argument("--config", help="a YAML file of TrainConfig fields (e.g. a run's config.yaml)")
    t.add_argument("--preset", choices=["small", "imagenet", "finetune"],
                   help="recipe defaults (default: small for digits/CIFAR, imagenet for folders)")
    for flag, typ, hlp in _TRAIN_FLAGS:
        t.add_argument(flag, type=typ, help=hlp, default=argparse.SUPPRESS)
    t.add_argument("--ema", action="store_true", default=argparse.SUPPRESS,
                   help="keep and evaluate an EMA of the weights")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field as YAML, e.g. --set hflip=0.5 --set 'model_overrides={embed_dim: 32}' "
                        "(quote a value with spaces); --set pretrained= clears a text option")
    t.add_argument("--resume", metavar="RUN", help="continue a run (its folder or a ckpt-*.pt)")

    e = sub.add_parser("eval", help="top-1, top-5, loss and img/s of a checkpoint on a dataset")
    e.add_argument("--checkpoint", required=True, help="a run folder, a run checkpoint, or a foreign checkpoint")
    e.add_argument("--data", help="digits, cifar10, cifar100, or a folder (its val/); default: the run's data")
    e.add_argument("--data-root", help="where CIFAR is stored (default: the run's, else ./data)")
    e.add_argument("--model", help="architecture of a foreign checkpoint (e.g. swin_t)")
    e.add_argument("--img-size", type=int, help="input size (default: the run's, else the model's)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=4)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--amp", default="auto", help="auto, off, bf16, fp16")
    e.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    pr = sub.add_parser("predict", help="top-5 labels with probabilities for images")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (every image inside)")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--model", help="architecture of a foreign checkpoint (e.g. swin_t)")
    pr.add_argument("--img-size", type=int, help="input size (default: the run's, else the model's)")
    pr.add_argument("--top-k", type=int, default=5, help="labels shown per image")
    pr.add_argument("--batch-size", type=int, default=32, help="images decoded and run at once")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    pr.add_argument("--ema", action="store_true", help="use the run's EMA weights")

    f = sub.add_parser("flops", help="parameters and FLOPs (official count) of a model")
    f.add_argument("name")
    f.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"))
    f.add_argument("--num-classes", type=int, default=None)
    f.add_argument("--window-size", type=int, default=None)

    c = sub.add_parser("convert", help="convert a checkpoint between key layouts")
    c.add_argument("input")
    c.add_argument("output", help="ends in .safetensors for safetensors, else a torch file")
    c.add_argument("--to", required=True, choices=["swin", "official", "timm", "torchvision", "hf", "mmdet"])
    c.add_argument("--from", dest="src", default="auto")
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    c.add_argument("--model", help="architecture name (swin models); needed to write V2 weights for "
                                   "torchvision/official, whose buffers depend on the window size")
    c.add_argument("--hf-version", type=int, choices=[4, 5], default=None,
                   help="transformers naming to write with --to hf (default: the installed version's; 5 "
                        "when transformers is not installed)")

    x = sub.add_parser("export", help="write a checkpoint as an ONNX file (onnxruntime, TensorRT, OpenVINO)",
                       description="Export to ONNX: dynamic batch, the image size fixed. onnxruntime runs the "
                                   "file before it is moved into place; its logits must equal the model's.")
    x.add_argument("checkpoint", help="a run folder, a run checkpoint, or a foreign checkpoint (with --model)")
    x.add_argument("output", help="the .onnx file to write")
    x.add_argument("--model", help="architecture of a foreign checkpoint (e.g. swin_t)")
    x.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"),
                   help="input size, H or H W (default: the run's or the model's)")
    x.add_argument("--batch", type=int, help="a fixed batch size (default: dynamic)")
    x.add_argument("--opset", type=int, help="ONNX opset (default 20: GELU as one node; 18 for older runtimes)")
    x.add_argument("--ema", action="store_true", help="export the run's EMA weights")
    x.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    x.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")

    pl = sub.add_parser("plot", help="PNG of a run's loss, accuracy and lr")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")

    sub.add_parser("models", help="list the registered model names")
    sub.add_parser("bench", help="throughput/latency/memory benchmarks (swin bench --help)", add_help=False)
    return p


# -- train ----------------------------------------------------------------------------------------

def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _number(yaml.safe_load(v))
    return out


def _number(value: Any) -> Any:
    """YAML 1.1 reads exponent notation without a dot ("2e-3") as a string: make it the float meant."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Config file {p} does not exist.")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"Config file {p} is not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(d, dict):
        raise ValueError(f"Config file {p} must hold a mapping of option: value.")
    return {k: _number(v) for k, v in d.items()}


def build_train_config(args: argparse.Namespace):
    """preset < run config (--resume) < --config file < --set < flags."""
    from .train import PRESETS, TrainConfig, resolve_resume

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "preset", "set", "resume")}
    file = _read_yaml(args.config) if args.config else {}
    sets = _parse_set(args.set)
    preset = args.preset or file.pop("preset", None)
    resume = None
    if args.resume:
        import torch

        resume = resolve_resume(args.resume)
        saved = torch.load(resume, map_location="cpu", weights_only=True).get("config")
        if saved is None:
            raise ValueError(f"{resume} is not a swin run checkpoint.")
        base = TrainConfig.from_dict(saved)
    else:
        data = flags.get("data", sets.get("data", file.get("data", "digits")))
        if preset is None:
            preset = "small" if data in ("digits", "cifar10", "cifar100") else "imagenet"
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        base = PRESETS[preset]()
        flags.setdefault("data", data)
    cfg = TrainConfig.from_dict(file, base=base)
    cfg = TrainConfig.from_dict(sets, base=cfg)
    cfg = TrainConfig.from_dict(flags, base=cfg)
    if resume is not None:
        from .data import absolute_data

        norm = {"data": absolute_data}  # a folder given relative to here is the run's absolute one
        changed = [k for k in RESUME_LOCKED
                   if norm.get(k, lambda v: v)(getattr(cfg, k)) != norm.get(k, lambda v: v)(getattr(base, k))]
        if changed:
            k = changed[0]
            raise ValueError(f"--resume continues a run exactly, and {k} differs from the run's ({getattr(base, k)!r} "
                             f"there, {getattr(cfg, k)!r} asked); leave it out, or start a new run from its weights "
                             f"with --pretrained {resume}.")
    return cfg, resume


# what a resumed run cannot change without breaking its exact continuation (its data order, schedule,
# model or folder); epochs may grow, and the machinery (device, workers, progress, ...) may change
RESUME_LOCKED = ("data", "model", "img_size", "num_classes", "drop_path", "model_overrides", "batch_size",
                 "accum_steps", "lr", "lr_batch", "warmup_epochs", "warmup_lr", "min_lr", "weight_decay",
                 "layer_decay", "betas", "eps", "clip_grad", "seed", "ema", "ema_decay", "out_dir", "name")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer

    cfg, resume = build_train_config(args)
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


# -- eval / predict --------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from . import data as D
    from .train import amp_dtype, check_labels, evaluate, load_for_inference

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be at least 1 and --workers at least 0, got {args.batch_size} and "
                         f"{args.workers}.")
    loaded = load_for_inference(args.checkpoint, model=args.model, img_size=args.img_size, use_ema=args.ema)
    data, root = args.data, args.data_root
    if data is None or root is None:
        run_data, run_root = _run_data(args.checkpoint)
        data = data or run_data
        root = root or run_root or "data"
        if data is None:
            raise ValueError("Give --data (digits, cifar10, cifar100 or a folder): "
                             "the checkpoint does not name its data.")
    # normalise as the model was trained (the run's statistics; ImageNet's for foreign weights)
    dataset, classes, _, _ = D.eval_split(data, loaded.img_size, root, loaded.classes,
                                          by_order=loaded.source != "run", num_classes=loaded.model.num_classes)
    mean, std = loaded.mean, loaded.std
    check_labels(len(classes), loaded.model.num_classes, "the checkpoint's model")
    device = _device(args.device)
    ds = D.Transformed(dataset, D.eval_transform(loaded.img_size, mean, std, loaded.eval_crop))
    skipped: list[str] = []
    m = evaluate(loaded.model.to(device), ds, batch_size=args.batch_size, device=device,
                 workers=0 if data == "digits" else args.workers, amp=amp_dtype(args.amp, device),
                 on_skip=skipped.extend)
    m["skipped_images"] = len(skipped)
    for p in skipped:
        print(f"warning: skipped unreadable image {D.describe_skip(p)}", file=sys.stderr)
    if m["images"] == 0:
        raise ValueError(f"None of the {len(skipped)} images of {data} could be read (see the warnings above); "
                         "check that the files are images.")
    if args.json:
        print(json.dumps(m))
    else:
        print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  {m['img_s']:.0f} img/s  "
              f"({m['images']} images of {data}, {loaded.img_size}px, {device})")
    return 0


def _device(name: str):
    import torch

    from .train import auto_threads, pick_device

    device = pick_device(name)
    if device.type == "cpu":
        torch.set_num_threads(auto_threads())
    return device


def _run_data(checkpoint: str) -> tuple[str | None, str | None]:
    """The data and data_root a run checkpoint was trained on ((None, None) for foreign weights)."""
    import torch

    from .train import RUN_FORMAT, run_weights

    p = Path(checkpoint)
    if p.is_dir():
        p = run_weights(p)  # the file load_for_inference reads
    if p is None or p.suffix not in (".pt", ".pth"):
        return None, None
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and obj.get("format") == RUN_FORMAT):
        return None, None
    config = obj.get("config", {})
    return config.get("data"), config.get("data_root")


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from . import data as D
    from .train import load_for_inference

    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}.")
    paths: list[tuple[str, bool]] = []  # (path, named by the user)
    for path in args.images:  # a folder stands for the images in it (hidden files left out)
        p = Path(path)
        if p.is_dir():
            found = D.image_files(p)
            if not found:
                raise ValueError(f"Folder {path} has no images ({', '.join(D.IMG_EXTENSIONS)}).")
            paths += [(str(f), False) for f in found]
        elif not p.is_file():
            raise FileNotFoundError(f"Image {path} does not exist.")
        else:
            paths.append((path, True))
    loaded = load_for_inference(args.checkpoint, model=args.model, img_size=args.img_size, use_ema=args.ema)
    device = _device(args.device)
    model = loaded.model.to(device)
    tf = D.eval_transform(loaded.img_size, loaded.mean, loaded.std, loaded.eval_crop)
    names = loaded.classes or []
    shown = 0
    for start in range(0, len(paths), args.batch_size):  # decode, run and print one batch at a time
        batch, images = [], []
        for path, named in paths[start:start + args.batch_size]:
            try:
                images.append(tf(D.open_rgb(path)))
                batch.append(path)
            except Exception as e:
                if named:  # a file the user named must be an image; one found in a folder is skipped
                    raise ValueError(f"Could not read image {path} ({type(e).__name__}).") from None
                print(f"warning: skipped unreadable image {path} ({type(e).__name__})", file=sys.stderr)
        if not images:
            continue
        with torch.inference_mode():
            probs = model(torch.stack(images).to(device)).float().softmax(dim=-1).cpu()
        k = min(args.top_k, probs.shape[1])
        for path, p in zip(batch, probs):
            top = p.topk(k)
            print(path)
            for prob, idx in zip(top.values.tolist(), top.indices.tolist()):
                print(f"  {prob:7.2%}  {names[idx] if idx < len(names) else f'class {idx}'}")
        sys.stdout.flush()
        shown += len(batch)
    if shown == 0:
        raise ValueError(f"None of the {len(paths)} images could be read (see the warnings above).")
    return 0


# -- flops / convert / plot / models ----------------------------------------------------------------

def cmd_flops(args: argparse.Namespace) -> int:
    import swin

    model = swin.create_model(args.name, num_classes=args.num_classes, window_size=args.window_size)
    size = args.img_size or list(model.config.img_size)
    if len(size) == 1:
        size = [size[0], size[0]]
    if len(size) != 2:
        raise ValueError(f"--img-size takes H or H W, got {len(size)} numbers.")
    n = swin.flops(model, img_size=(size[0], size[1]))
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.name} at {size[0]}x{size[1]}: {params:,} params ({params / 1e6:.2f}M), "
          f"{n:,} FLOPs ({f'{n / 1e9:.2f} G' if n >= 1e8 else f'{n / 1e6:.2f} M'} multiply-adds)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import swin
    from swin.convert import save_state_dict

    from .train import read_state_dict, run_config, run_weights

    src, out = Path(args.input), Path(args.output)
    if src.is_dir():  # a run folder (its best.pt, else the latest ckpt), or a transformers save_pretrained folder
        from swin.convert import folder_checkpoint

        src = run_weights(src) or folder_checkpoint(src)
    if not src.is_file():
        raise FileNotFoundError(f"Checkpoint {src} does not exist.")
    if out.resolve() == src.resolve():
        raise ValueError("OUTPUT must differ from INPUT.")
    _check_output(out, args.force)
    from swin.convert import read_file

    obj = read_file(src)  # once: the tensors, and a run's architecture
    sd = read_state_dict(src, obj)
    # a run checkpoint names its architecture: the layouts that size buffers by stage need it (a stage map
    # smaller than the window, V2's windows)
    config = swin.get_config(args.model) if args.model else run_config(obj)
    converted = swin.convert_state_dict(sd, src=args.src, dst=args.to, config=config, hf_version=args.hf_version)
    try:
        save_state_dict(converted, out)
    except OSError as e:
        raise ValueError(f"Cannot write {out} ({e.strerror or e}).") from None
    print(f"Wrote {len(converted)} tensors in the {args.to} layout to {out}")
    return 0


def _check_output(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists (unless ``force``), is a folder, or cannot be
    created; creates its missing parent folders."""
    from .train import file_on_path

    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name for the output.")
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; choose another name or pass --force to overwrite it.")
    blocking = file_on_path(out)
    if blocking is not None:
        raise ValueError(f"Cannot write {out}: {blocking} is a file, not a folder.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create the folder for {out} ({e.strerror or e}).") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"Cannot write {out}: no write permission in {out.parent}.")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .train import load_for_inference

    out = Path(args.output)
    _check_output(out, args.force)  # before loading anything
    size = args.img_size or []
    if len(size) > 2:
        raise ValueError(f"--img-size takes H or H W, got {len(size)} numbers.")
    loaded = load_for_inference(args.checkpoint, model=args.model, img_size=min(size) if size else None,
                                use_ema=args.ema)
    hw = (size[0], size[-1]) if size else (loaded.img_size, loaded.img_size)
    meta = {"swin.mean": ",".join(map(str, loaded.mean)), "swin.std": ",".join(map(str, loaded.std)),
            "swin.eval_crop": str(loaded.eval_crop)}
    if loaded.classes:
        meta["swin.classes"] = json.dumps(loaded.classes)
    try:
        r = export_onnx(loaded.model, out, img_size=hw, batch=args.batch, opset=args.opset,
                        metadata=meta, check=args.check, force=args.force)
    except ImportError as e:  # the optional packages: one line, as any other input error
        raise ValueError(str(e)) from None
    n = args.batch or "N"
    check = (f"onnxruntime's logits within {r['max_rel_err']:.1e} of the model's" if r["max_rel_err"] is not None
             else "not run in onnxruntime")
    print(f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {r['seconds']:.0f} s): pixel_values ({n}, 3, "
          f"{hw[0]}, {hw[1]}) normalised with mean {loaded.mean}, std {loaded.std} -> "
          f"logits ({n}, {loaded.model.num_classes}); {check}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train import atomic_savefig, read_metrics

    run = Path(args.run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl (is it a run folder of swin train?).")
    rows = read_metrics(path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_top1" in r]
    if not train:
        raise ValueError(f"{path} has no training steps to plot yet.")
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
        ax[1].plot([r["epoch"] for r in val], [r["val_top1"] for r in val], "o-", label="top-1")
        ax[1].plot([r["epoch"] for r in val], [r["val_top5"] for r in val], "o-", label="top-5")
        if "val_ema_top1" in val[0]:
            ax[1].plot([r["epoch"] for r in val], [r["val_ema_top1"] for r in val], "o--", label="EMA top-1")
    ax[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    for a, title, xl in zip(ax, ("loss", "val accuracy (%)", "learning rate"), ("step", "epoch", "step")):
        a.set_title(title)
        a.set_xlabel(xl)
        a.grid(alpha=0.3)
    ax[0].legend()
    if val:  # no curves (and no legend) before the first evaluation
        ax[1].legend()
    fig.suptitle(run.name)
    fig.tight_layout()
    out = Path(args.out) if args.out else run / "metrics.png"
    _check_output(out, force=True)  # the plot is redrawn from the metrics: an older one is replaced
    atomic_savefig(fig, out)
    plt.close(fig)
    print(f"Wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import swin

    print("\n".join(swin.list_models()))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "flops": cmd_flops,
            "convert": cmd_convert, "export": cmd_export, "plot": cmd_plot, "models": cmd_models}


def _run(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError

    try:
        return COMMANDS[args.command](args)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


_PACKAGE = Path(__file__).resolve().parent


def _show_warning(message, category, filename, lineno, file=None, line=None, *, fallback) -> None:
    """The library's own warnings as one ``warning: ...`` line, like the CLI's other warnings; any
    other warning (torch's, a user's) the way Python shows it."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE) and issubclass(category, UserWarning)
    except (OSError, ValueError):
        ours = False
    if ours:
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        fallback(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmark has its own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = _parser()
    if not argv:
        argv = ["train"]  # `swin` alone is the demo too
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, fallback=warnings.showwarning)
            return _run(args)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("SWIN_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process finds the same error: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # also while torch is still being imported
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `swin models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
