"""Every `swin` subcommand end to end on small inputs, and every bad input as one line + exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import swin
from swin import cli
from swin import data as D
from swin.train import evaluate, imagenet_classes

ROOT = Path(__file__).resolve().parents[1]
TINY = "model_overrides={embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One real (tiny, 1-epoch) digits run through `swin train`, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "runs"
    rc = cli.main(["train", "--set", TINY, "--epochs", "1", "--batch-size", "128", "--lr", "0.04",
                   "--threads", "1", "--no-progress", "--device", "cpu", "--out-dir", str(out), "--name", "tiny"])
    assert rc == 0
    return out / "tiny"


def digit_pngs(folder: Path, n: int = 3) -> tuple[list[Path], list[int]]:
    _, val, _ = D.load_digits(32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"digit{i}.png"
        Image.fromarray(val.images[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths, val.labels[:n].tolist()


def test_train_writes_a_run_that_eval_and_plot_read(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 11
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir, "--json", "--device", "cpu")
    assert rc == 0
    m = json.loads(out)
    assert m["images"] == 360 and abs(m["top1"] - summary["val_top1"]) < 1e-9 and m["top1"] <= m["top5"]
    assert m["img_s"] > 0 and m["loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir / "best.pt", "--data", "digits", "--device", "cpu")
    assert rc == 0 and out.startswith("top-1 ") and "360 images of digits" in out
    rc, out, _ = run_cli(capsys, "plot", run_dir)
    png = run_dir / "metrics.png"
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resuming_a_finished_run_changes_nothing(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    rc, out, _ = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert rc == 0 and "has already trained its 1 epochs; nothing to do" in out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_eval_refuses_a_folder_whose_classes_are_not_the_runs(run_dir, tmp_path, capsys):
    """Folders named as some of the run's classes and some not: labels by name would be partial and
    labels by sorted folder order wrong; either way the accuracy printed would be meaningless."""
    paths, labels = digit_pngs(tmp_path / "src", 4)
    for p, y in zip(paths, labels):
        for name in (str(y), "zebra"):
            (tmp_path / "mixed" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "mixed" / name / p.name).write_bytes(p.read_bytes())
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", tmp_path / "mixed", "--workers", "0")
    assert rc == 2 and "['zebra']" in err and "are not classes of the checkpoint" in err


def test_predict_takes_a_folder_and_plot_a_new_folder(run_dir, tmp_path, capsys):
    paths, _ = digit_pngs(tmp_path / "imgs", 3)
    rc, out, _ = run_cli(capsys, "predict", tmp_path / "imgs", "--checkpoint", run_dir, "--top-k", "2")
    assert rc == 0 and [ln for ln in out.splitlines() if not ln.startswith(" ")] == [str(p) for p in paths]
    with open(run_dir / "metrics.jsonl") as f:
        lines = f.read()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text(lines + '{"step": 99, "loss": 1.')  # a run killed mid-line
    rc, out, _ = run_cli(capsys, "plot", cut, "--out", tmp_path / "new" / "sub" / "m.png")
    assert rc == 0 and (tmp_path / "new" / "sub" / "m.png").is_file()
    assert not [p for p in (tmp_path / "new" / "sub").iterdir() if p.name.startswith(".")]  # no temp file left


def test_export_of_a_run_carries_its_classes_and_normalisation(run_dir, tmp_path, capsys):
    """`swin export RUN out.onnx`: the run's class names and the digits statistics go into the file's
    metadata; onnxruntime's logits equal the run's model (the check inside export, and here)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from swin.export import onnx_session, rel_err
    from swin.train import load_for_inference

    rc, out, _ = run_cli(capsys, "export", run_dir, tmp_path / "run.onnx")
    assert rc == 0 and "logits (N, 10)" in out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "run.onnx")).metadata_props}
    loaded = load_for_inference(run_dir)
    assert json.loads(meta["swin.classes"]) == loaded.classes == [str(i) for i in range(10)]
    assert meta["swin.mean"] == ",".join(map(str, D.DIGITS_MEAN)) != ",".join(map(str, D.IMAGENET_MEAN))
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        ref = loaded.model(x)
    assert rel_err(onnx_session(tmp_path / "run.onnx").run(None, {"pixel_values": x.numpy()})[0], ref) <= 1e-5
    rc, out, _ = run_cli(capsys, "export", run_dir, tmp_path / "wide.onnx", "--img-size", "32", "48", "--batch", "2")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "wide.onnx")).metadata_props}
    assert rc == 0 and "pixel_values (2, 3, 32, 48)" in out and meta["swin.img_size"] == "32,48"


def test_predict_prints_top5_with_the_runs_class_names(run_dir, tmp_path, capsys):
    paths, _ = digit_pngs(tmp_path)
    rc, out, _ = run_cli(capsys, "predict", *paths, "--checkpoint", run_dir, "--device", "cpu")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3 * 6 and lines[0] == str(paths[0])
    rows = [ln.split() for ln in lines[1:6]]
    probs = [float(r[0].rstrip("%")) for r in rows]
    assert all(r[1] in [str(d) for d in range(10)] for r in rows)
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01


def test_eval_of_unnamed_foreign_classes_needs_a_folder_for_every_output(tmp_path, capsys):
    """Weights without class names label the folders in sorted order: with a class folder missing, every
    label after it would be wrong (a review's repro: 100% read as 0%), so eval refuses."""
    torch.save(swin.create_model("swin_micro_p4", num_classes=3).state_dict(), tmp_path / "three.pth")
    for name in ("a", "b"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (9, 90, 200)).save(tmp_path / "val" / name / "0.png")
    args = ["eval", "--checkpoint", tmp_path / "three.pth", "--model", "swin_micro_p4", "--data", tmp_path,
            "--img-size", "32", "--device", "cpu", "--workers", "0", "--json"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "one folder for each of its 3 outputs (found 2)" in err
    (tmp_path / "val" / "c").mkdir()
    Image.new("RGB", (40, 40), (9, 90, 200)).save(tmp_path / "val" / "c" / "0.png")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and json.loads(out)["images"] == 3


def test_foreign_checkpoint_convert_then_eval_and_predict(tmp_path, capsys):
    torch.manual_seed(0)
    model = swin.create_model("swin_micro_p4", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    rc, out, _ = run_cli(capsys, "convert", tmp_path / "ours.pth", tmp_path / "timm.safetensors", "--to", "timm")
    assert rc == 0 and "timm" in out
    from safetensors.torch import load_file

    assert "head.fc.weight" in load_file(str(tmp_path / "timm.safetensors"))
    before = (tmp_path / "timm.safetensors").read_bytes()
    rc, _, err = run_cli(capsys, "convert", tmp_path / "ours.pth", tmp_path / "timm.safetensors", "--to", "official")
    assert rc == 2 and "already exists" in err and (tmp_path / "timm.safetensors").read_bytes() == before
    rc, _, _ = run_cli(capsys, "convert", tmp_path / "timm.safetensors", tmp_path / "back.pth", "--to", "swin")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert rc == 0 and all(torch.equal(back[k], v) for k, v in model.state_dict().items())

    # with --model: stage 3's 2 x 2 map runs a 2 x 2 window, and timm's table there is sized for it, as timm's
    # own model at 32 px has it (a full table means a block that ran the full window: the loader resizes it)
    rc, _, _ = run_cli(capsys, "convert", tmp_path / "ours.pth", tmp_path / "timm32.safetensors", "--to", "timm",
                       "--model", "swin_micro_p4")
    assert rc == 0 and load_file(str(tmp_path / "timm32.safetensors"))[
        "layers.2.blocks.0.attn.relative_position_bias_table"].shape[0] == 9
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", tmp_path / "timm32.safetensors", "--model", "swin_micro_p4",
                         "--data", "digits", "--json", "--device", "cpu")
    assert rc == 0
    _, val, _ = D.load_digits(32)
    expected = evaluate(model, D.Transformed(val, D.eval_transform(32, D.IMAGENET_MEAN, D.IMAGENET_STD, 1.0)))
    got = json.loads(out)
    assert got["top1"] == expected["top1"] and got["loss"] == pytest.approx(expected["loss"], abs=1e-5)

    big = swin.create_model("swin_micro_p4", num_classes=1000)
    torch.save({"model": big.state_dict()}, tmp_path / "in1k.pth")
    paths, _ = digit_pngs(tmp_path / "imgs", 1)
    rc, out, _ = run_cli(capsys, "predict", paths[0], "--checkpoint", tmp_path / "in1k.pth", "--model", "swin_micro_p4",
                         "--device", "cpu")
    names = set(imagenet_classes())
    assert rc == 0 and len(names) == 1000
    assert all(" ".join(ln.split()[1:]) in names for ln in out.splitlines()[1:6])


def test_flops_models_and_python_m(capsys):
    rc, out, _ = run_cli(capsys, "flops", "swin_t", "--img-size", "224", "224")
    assert rc == 0 and "28,288,354 params" in out and "4,494,405,120 FLOPs" in out
    rc, out, _ = run_cli(capsys, "flops", "swinv2_t_w8", "--img-size", "256")
    assert rc == 0 and "5,925,697,536 FLOPs" in out
    r = subprocess.run([sys.executable, "-m", "swin", "models"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=120)
    assert r.returncode == 0 and "swin_micro_p4" in r.stdout.split() and "swin_t" in r.stdout.split()


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("swin.bench")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "swin.bench", fake)
    assert cli.main(["bench", "--model", "swin_t", "--batch", "8"]) == 0
    assert seen == [["--model", "swin_t", "--batch", "8"]]


def test_config_file_presets_and_flag_precedence(tmp_path, run_dir):
    parser = cli._parser()
    f = tmp_path / "c.yaml"
    f.write_text("preset: small\nepochs: 7\nlr: 0.01\nhflip: 0.25\n")
    cfg, resume = cli.build_train_config(parser.parse_args(["train", "--config", str(f), "--epochs", "2",
                                                            "--set", "hflip=0.5"]))
    assert (cfg.epochs, cfg.lr, cfg.hflip, cfg.model, cfg.data) == (2, 0.01, 0.5, "swin_micro_p4", "digits")
    assert resume is None
    f.write_text("lr: 3e-3\nname: 1e5x\n")  # YAML 1.1 would read 3e-3 as a string
    cfg, _ = cli.build_train_config(parser.parse_args(["train", "--config", str(f), "--set", "weight_decay=2e-2"]))
    assert (cfg.lr, cfg.weight_decay, cfg.name) == (3e-3, 2e-2, "1e5x")
    cfg, _ = cli.build_train_config(parser.parse_args(["train", "--data", str(tmp_path)]))
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.mixup, cfg.rand_augment) == \
        ("swin_t", 300, 1024, 5e-4, 0.8, 9)
    args = ["train", "--preset", "finetune", "--data", "x", "--layer-decay", "0.9"]
    cfg, _ = cli.build_train_config(parser.parse_args(args))
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.layer_decay) == (2e-5, 1e-8, 30, 0.9)
    # a run's config.yaml is a valid --config, and --resume starts from the run's config
    cfg, _ = cli.build_train_config(parser.parse_args(["train", "--config", str(run_dir / "config.yaml")]))
    assert cfg.model_overrides == {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]} and cfg.batch_size == 128
    cfg, resume = cli.build_train_config(parser.parse_args(["train", "--resume", str(run_dir), "--epochs", "3"]))
    assert resume.name == "ckpt-0000011.pt" and cfg.epochs == 3 and cfg.name == "tiny"


def _bad_cases(tmp: Path, run_dir: Path) -> list[tuple[list, str]]:
    from test_data import write_folder

    noval = write_folder(tmp / "noval", splits=("train",))
    empty = write_folder(tmp / "empty")
    (empty / "train" / "ghost").mkdir()
    twelve = write_folder(tmp / "twelve", classes=[str(i) for i in range(12)], per_class=1, splits=("val",))
    torch.save(swin.create_model("swin_micro_p4").state_dict(), tmp / "foreign.pth")
    torch.save(swin.create_model("swin_micro_p4", num_classes=0).state_dict(), tmp / "backbone.pth")
    (tmp / "afile").write_text("")
    (tmp / "adir").mkdir()
    (tmp / "bad.yaml").write_text("epochs: [unclosed\n")
    out = ["--out-dir", tmp / "runs"]
    return [
        (["train", "--data", tmp / "missing", *out], "Data directory"),
        (["train", "--data", noval, *out], "has no val/ folder"),
        (["train", "--data", empty, *out], "ghost has no images"),
        (["train", "--num-classes", "5", *out], "labels 5..9 would be out of range"),
        (["train", "--img-size", "8", *out], "too small for swin_micro_p4: it needs at least 16"),
        (["train", "--model", "swin_mikro", *out], "Unknown model"),
        (["train", "--set", "epoch=3", *out], "Unknown training option"),
        (["train", "--config", tmp / "nope.yaml", *out], "does not exist"),
        (["train", "--config", tmp / "bad.yaml", *out], "not valid YAML"),
        (["train", "--resume", tmp / "nope", *out], "Nothing to resume"),
        (["train", "--data", "cifar10", "--data-root", tmp / "cifar", *out], "could not be downloaded"),
        (["eval", "--checkpoint", tmp / "nope.pt", "--data", "digits"], "does not exist"),
        (["eval", "--checkpoint", tmp / "foreign.pth", "--data", "digits"], "pass --model"),
        (["eval", "--checkpoint", run_dir, "--data", twelve], "Folder(s) ['10', '11']"),
        (["predict", tmp / "nope.png", "--checkpoint", run_dir], "Image"),
        (["eval", "--checkpoint", tmp / "backbone.pth", "--model", "swin_micro_p4", "--data", "digits"],
         "has no classifier head"),
        (["predict", tmp / "afile", "--checkpoint", tmp / "backbone.pth", "--model", "swin_micro_p4"],
         "has no classifier head"),
        (["eval", "--checkpoint", tmp / "adir", "--model", "swin_micro_p4", "--data", "digits"], "no best.pt"),
        (["convert", tmp / "nope.pth", tmp / "o.pth", "--to", "timm"], "does not exist"),
        (["convert", tmp / "foreign.pth", tmp / "adir", "--to", "timm"], "is a folder"),
        (["convert", tmp / "foreign.pth", tmp / "afile" / "o.pth", "--to", "timm"], "afile is a file, not a folder"),
        (["convert", tmp / "adir", tmp / "o.pth", "--to", "timm"], "is a folder without"),
        (["plot", tmp], "has no metrics.jsonl"),
        (["plot", run_dir, "--out", tmp / "adir"], "is a folder"),
        (["train", "--min-lr", "-1", *out], "min_lr must be >= 0"),
        (["train", "--drop-path", "2", *out], r"drop_path must be in [0, 1)"),
        (["train", "--workers", "-1", *out], "workers must be >= 0"),
        (["train", "--label-smoothing", "1.5", *out], "label_smoothing must be in [0, 1)"),
        (["train", "--out-dir", tmp / "afile"], "is a file"),
        (["train", "--resume", run_dir, "--batch-size", "64"], "batch_size differs from the run's"),
        (["predict", tmp / "nope.png", "--checkpoint", run_dir, "--top-k", "0"], "--top-k must be at least 1"),
        (["predict", tmp / "adir", "--checkpoint", run_dir], "has no images"),
        (["eval", "--checkpoint", run_dir, "--data", "digits", "--ema"], "has no EMA weights"),
        (["eval", "--checkpoint", run_dir, "--data", "digits", "--model", "swin_t"], "is a run of swin_micro_p4"),
        (["eval", "--checkpoint", run_dir, "--data", "digits", "--workers", "-1"], "--workers at least 0"),
        (["export", run_dir, tmp / "o.onnx", "--opset", "5"], "opset must be 18 or later"),
        # values of the wrong type, as YAML hands them over
        (["train", "--set", "crop_scale=0.5", *out], "crop_scale must be two numbers"),
        (["train", "--set", "betas=[0.9]", *out], "betas must be two numbers"),
        (["train", "--set", "lr=abc", *out], "lr must be a number, got 'abc'"),
        (["train", "--set", "epochs=2.5", *out], "epochs must be a whole number, got 2.5"),
        (["train", "--set", "ema=1", *out], "ema must be true or false"),
        (["train", "--set", "compile=on", *out], "compile must be one of off, default, reduce-overhead, max-autotune; got 'on'"),
        (["train", "--set", "model_overrides=3", *out], "model_overrides must be a mapping"),
        (["train", "--set", "model_overrides={embed_dim:16}", *out], "Unknown config field(s) ['embed_dim:16']"),
        (["train", "--set", "rand_augment=20", *out], "rand_augment must be in [0, 10]"),
        (["train", "--out-dir", tmp / "afile" / "sub"], "afile is a file"),
        (["train", "--out-dir", "/proc/swin-runs", "--max-steps", "1"], "cannot be created"),
        (["train", "--set", "model_overrides={drop_path_rate: 0.3}", *out], "use --drop-path"),
        (["predict", tmp / "nope.png", "--checkpoint", run_dir, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["predict", tmp / "afile", "--checkpoint", run_dir, "--device", "gpu"], "Unknown device 'gpu'"),
        (["eval", "--checkpoint", run_dir, "--data", "digits", "--device", "mps"], "Unknown device 'mps'"),
        (["eval", "--checkpoint", run_dir, "--data", "digits", "--img-size", "0"], "Image size 0 is too small"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, run_dir, capsys, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            if download:
                raise OSError("network is unreachable")
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    for argv, msg in _bad_cases(tmp_path, run_dir):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no work was started


def test_convert_v2_to_torchvision_needs_and_takes_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = swin.create_model("swinv2_micro", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "v2.pth")
    rc, _, err = run_cli(capsys, "convert", tmp_path / "v2.pth", tmp_path / "tv.pth", "--to", "torchvision")
    assert rc == 2 and "--model" in err and not (tmp_path / "tv.pth").exists()
    rc, _, _ = run_cli(capsys, "convert", tmp_path / "v2.pth", tmp_path / "tv.pth", "--to", "torchvision",
                       "--model", "swinv2_micro")
    assert rc == 0
    tv = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert any(k.startswith("features.") for k in tv)
    back = swin.convert_state_dict(tv, dst="swin")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_junk_checkpoint_is_one_clear_error(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01not a checkpoint")
    rc, _, err = run_cli(capsys, "convert", junk, tmp_path / "out.pth", "--to", "timm")
    assert rc == 2 and "Could not read checkpoint" in err and "Traceback" not in err


def test_bench_default_includes_the_fastest_compiled_peer():
    """By default the table holds the compiled peer that is fastest on that device; --compile adds the
    other compiled variants, each implementation once."""
    from swin import bench

    impls = bench.parse_args(["--device", "cpu"]).impls.split(",")
    assert "timm-sdpa+compile" in impls and impls[0] == "ours"
    impls = bench.parse_args(["--device", "cpu", "--compile"]).impls.split(",")
    assert len(impls) == len(set(impls)) and {"ours+compile", "hf+compile", "timm-sdpa+compile"} <= set(impls)
    # on a CPU the deployment peer too: timm's model exported and run by onnxruntime (when installed)
    assert ("timm+ort" in impls) == ("tv+ort" in impls) == ("hf+ort" in impls) == bench._has_onnx()
    assert "hf+compile" in bench.parse_args(["--device", "cpu"]).impls.split(",")
    assert not bench._applies("timm+ort", "train") and bench._applies("timm+ort", "infer")


def test_bench_without_the_peers_packages_says_how_to_install_them(tmp_path, monkeypatch, capsys):
    """A runtime-only install (no timm, transformers): the default field leaves those peers out with one
    note, and a peer named in --impls is one line naming the extra, not a traceback."""
    from swin import bench, export

    real = export.installed
    monkeypatch.setattr(export, "installed", lambda *m: real(*m) and not {"timm", "transformers"} & set(m))
    impls = bench.parse_args(["--device", "cpu"]).impls.split(",")
    err = capsys.readouterr().err
    assert "ours" in impls and "tv" in impls and not [i for i in impls if i.split("+")[0] in ("timm", "timm-sdpa", "hf")]
    assert "pip install 'swin[bench]'" in err and "timm-sdpa+compile" in err and err.count("\n") == 1
    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--models", "swin_t", "--modes", "infer", "--impls", "ours,timm",
                       "--rounds", "1", "--iters", "1", "--warmup", "0", "--batch-infer", "1", "--no-parity",
                       "--out", str(out)]) == 0
    err = capsys.readouterr().err
    entries = {e["impl"]: e for e in json.loads((out / "bench.json").read_text())["entries"]}
    assert entries["timm"]["error"] == "timm not installed: pip install 'swin[bench]'"
    assert entries["ours"]["median"] > 0 and "Traceback" not in err


def test_bench_runs_ours_against_timm_on_cpu(tmp_path):
    """The real benchmark, smallest settings: a table and JSON, and ours keeps fewer activations."""
    pytest.importorskip("timm")
    from swin import bench

    out = tmp_path / "bench"
    impls = "ours,timm,timm+ort" if bench._has_onnx() else "ours,timm"
    assert bench.main(["--device", "cpu", "--models", "swin_t", "--modes", "infer,train", "--impls", impls,
                       "--rounds", "1", "--iters", "1", "--warmup", "0", "--batch-infer", "1",
                       "--batch-train", "2", "--drop-path", "0", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    entries = {(e["mode"], e["impl"]): e for e in report["entries"]}
    assert all(e["median"] > 0 and e["error"] is None for e in entries.values())
    assert entries[("infer", "ours")]["parity_rel_err"] <= 1e-5
    if bench._has_onnx():  # onnxruntime's logits against timm's own, checked before timing; no training entry
        assert entries[("infer", "timm+ort")]["parity_rel_err"] <= 1e-4 and ("train", "timm+ort") not in entries
    ours, timm = entries[("train", "ours")], entries[("train", "timm")]
    # GELU's output is not kept (swin.ops.mlp): 4C values per token per block fewer than timm
    assert ours["saved_vs_timm"] < 0.9 and timm["saved_vs_timm"] == 1.0
    assert "| ours |" in (out / "bench.md").read_text()
    from PIL import Image

    with Image.open(out / "bench.png") as im:  # one panel per (model, mode): taller than one panel
        assert im.format == "PNG" and im.size[0] == 900 and im.size[1] > 300
    assert not list(out.glob(".*tmp*"))  # written through temporary files, none left behind


def test_profile_script_groups_the_time(tmp_path):
    """benchmarks/gpu_profile.py (run by benchmarks/gpu_check.sh on a GPU) on the CPU, smallest sizes:
    a table per implementation and mode, with group shares that add up to the whole."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    assert prof.group_of("aten::addmm") == "matmul" and prof.group_of("aten::native_layer_norm") == "norm"
    # CUDA: a CPU op row carries its kernels' time as its own; only the kernel rows count
    from types import SimpleNamespace as Row

    cpu, dev = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [Row(key="aten::addmm", device_type=cpu, self_device_time_total=5.0),
            Row(key="nvjet_gemm", device_type=dev, self_device_time_total=5.0),
            Row(key="triton_poi_fused_gelu", device_type=cpu, self_device_time_total=2.0),
            Row(key="triton_poi_fused_gelu", device_type=dev, self_device_time_total=2.0),
            Row(key="aten::empty", device_type=cpu, self_device_time_total=0.0)]
    assert sum(prof.self_time_us(e, True) for e in prof.timed_rows(rows, cuda=True)) == 7.0
    assert prof.main(["--device", "cpu", "--size", "64", "--impls", "ours", "--modes", "infer,train",
                      "--batch-infer", "1", "--batch-train", "1", "--warmup", "1", "--steps", "1",
                      "--out", str(tmp_path)]) == 0
    for mode in ("infer", "train"):
        text = (tmp_path / f"ours_{mode}.txt").read_text()
        shares = [float(line.split("|")[2].strip().rstrip("%")) for line in text.splitlines()
                  if line.startswith("| ") and line.count("|") == 3 and "%" in line]
        assert abs(sum(shares) - 100.0) < 0.5 and "matmul" in text, text


def test_bench_isolated_rounds_run_in_fresh_processes(tmp_path, monkeypatch):
    """--isolate: each (round, implementation) is a child process of the same benchmark; the samples,
    round 0's parity and a child's failure come back into one table. A chart that cannot be drawn
    (on the H200 a SIGTERM left matplotlib half-imported) costs the chart only."""
    from swin import bench

    def broken_chart(*a, **k):
        raise AttributeError("module 'matplotlib' has no attribute 'get_data_path'")

    monkeypatch.setattr(bench, "to_png", broken_chart)
    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--models", "swin_t", "--modes", "infer", "--impls", "ours,tv,ours+cast",
                       "--rounds", "2", "--iters", "1", "--warmup", "0", "--batch-infer", "1", "--isolate",
                       "--out", str(out)]) == 0
    entries = {e["impl"]: e for e in json.loads((out / "bench.json").read_text())["entries"]}
    for impl in ("ours", "tv"):
        assert len(entries[impl]["samples"]) == 2 and entries[impl]["median"] > 0 and entries[impl]["error"] is None
    assert entries["ours"]["parity_rel_err"] <= 1e-5 and entries["tv"]["vs_best_peer"] == 1.0
    assert "+cast needs" in entries["ours+cast"]["error"] and not entries["ours+cast"]["samples"]
    assert (out / "bench.log").read_text().count("(fresh process") == 4
    assert "each round in fresh processes" in (out / "bench.md").read_text()
    assert "bench.png skipped: AttributeError" in (out / "bench.log").read_text() and not (out / "bench.png").exists()


def test_bench_cast_times_a_16_bit_model(tmp_path):
    """+cast: the model and its input in --dtype (no autocast), ours against the fp32 reference
    within bf16 rounding; not a training entry; refused in fp32."""
    pytest.importorskip("timm")
    from swin import bench

    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--dtype", "bf16", "--models", "swin_t", "--modes", "infer,train",
                       "--impls", "ours+cast,timm+cast", "--rounds", "1", "--iters", "1", "--warmup", "0",
                       "--batch-infer", "1", "--out", str(out)]) == 0
    entries = {(e["mode"], e["impl"]): e for e in json.loads((out / "bench.json").read_text())["entries"]}
    assert set(entries) == {("infer", "ours+cast"), ("infer", "timm+cast")}  # no training with +cast
    ours = entries[("infer", "ours+cast")]
    assert ours["error"] is None and ours["median"] > 0 and 1e-4 < ours["parity_rel_err"] <= 3e-2, ours
    assert bench.main(["--device", "cpu", "--models", "swin_t", "--modes", "infer", "--impls", "ours+cast",
                       "--rounds", "1", "--iters", "1", "--warmup", "0", "--batch-infer", "1", "--out", str(out)]) == 0
    err = json.loads((out / "bench.json").read_text())["entries"][0]["error"]
    assert "+cast needs --dtype bf16 or fp16" in err


def test_bench_refuses_bad_arguments_in_one_line(capsys):
    """Batch 0 ran batch 8, --iters 0 ran 2, an unknown mode or implementation gave a traceback or a
    table row and exit 0: each is now one argparse error (exit 2) before any work."""
    from swin import bench

    cases = [(["--batch-infer", "0"], "--batch-infer must be at least 1, got 0"),
             (["--batch-train", "-2"], "--batch-train must be at least 1"),
             (["--iters", "0"], "--iters must be at least 1"), (["--threads", "0"], "--threads must be at least 1"),
             (["--modes", "inference"], "--modes takes a comma list of infer, train, latency"),
             (["--impls", "ours,foo"], "Unknown implementation 'foo'"),
             (["--impls", "ours+bogus"], "Unknown flag(s) +bogus in 'ours+bogus'")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(["--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and msg in err, (argv, err)


def test_bench_rejects_an_unknown_flag():
    """A typo in a flag must not silently bench the eager model under the compiled name."""
    from swin import bench

    with pytest.raises(ValueError, match=r"Unknown flag\(s\) \+compil in 'ours\+compil'"):
        bench._build("ours+compil", "swin_t", 0.1)


def test_bench_train_peak_counts_a_cuda_graph_pool(monkeypatch):
    """A graph's replays allocate nothing, so their allocated peak misses the pool the recording filled
    (stop 25, H200: 0.32 GiB for Swin-T b128 under reduce-overhead); the pool stays reserved after
    empty_cache(), and the larger reading counts. Eager steps: the allocated peak counts."""
    from swin import bench

    state = {}

    def fake(allocated_peak, reserved_after):
        state.update(peak=allocated_peak, reserved=reserved_after, steps=0)
        for name, fn in (("reset_peak_memory_stats", lambda: None), ("synchronize", lambda: None),
                         ("empty_cache", lambda: None), ("max_memory_allocated", lambda: state["peak"]),
                         ("memory_reserved", lambda: state["reserved"])):
            monkeypatch.setattr(torch.cuda, name, fn)

    def step(i):
        state["steps"] += 1

    GiB = 2**30
    fake(allocated_peak=int(1.32 * GiB), reserved_after=int(9.0 * GiB))  # graph: weights + pool reserved
    assert bench._train_peak_bytes(step, base=GiB, base_reserved=2 * GiB) == 7 * GiB and state["steps"] == 2
    fake(allocated_peak=9 * GiB, reserved_after=4 * GiB)  # eager: activations freed after the step
    assert bench._train_peak_bytes(step, base=GiB, base_reserved=2 * GiB) == 8 * GiB


def _digit_in_modes(folder: Path) -> tuple[list[Path], np.ndarray]:
    """One digit saved as 8-bit grayscale, 16-bit grayscale (I;16) and float (F, in 0..1) files."""
    _, val, _ = D.load_digits(32)
    gray = val.images[0, 0].numpy()  # uint8 (32, 32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "gray8.png", folder / "gray16.png", folder / "float.tif"]
    Image.fromarray(gray, "L").save(paths[0])
    Image.fromarray(gray.astype(np.uint16) * 257).save(paths[1])
    Image.fromarray(gray.astype(np.float32) / 255.0, "F").save(paths[2])
    return paths, gray


def test_16bit_and_float_images_read_as_the_same_picture(run_dir, tmp_path, capsys):
    """Pillow's convert("RGB") clips 16-bit pixels at 255 (a mask) and float ones at their raw values
    (near black); the loader rescales them, so the three files give one picture and one prediction."""
    paths, gray = _digit_in_modes(tmp_path / "modes")
    with Image.open(paths[1]) as im:
        assert im.mode.startswith("I")
    for p in paths:
        rgb = np.asarray(D.open_rgb(p))
        assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 1].astype(int) - gray).max() <= 1, p
    rc, out, _ = run_cli(capsys, "predict", *paths, "--checkpoint", run_dir, "--top-k", "1")
    tops = [ln for ln in out.splitlines() if ln.startswith(" ")]
    assert rc == 0 and len(tops) == 3 and len(set(tops)) == 1, tops


def test_folder_scans_leave_out_hidden_files(run_dir, tmp_path, capsys):
    """macOS ._ files (not images) and .ipynb_checkpoints copies are not data: predict and eval skip them."""
    paths, labels = digit_pngs(tmp_path / "src", 2)
    for p, y in zip(paths, labels):
        (tmp_path / "val" / str(y)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / str(y) / p.name).write_bytes(p.read_bytes())
    first = tmp_path / "val" / str(labels[0])
    (first / "._digit0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (first / ".ipynb_checkpoints").mkdir()
    (first / ".ipynb_checkpoints" / "digit0-checkpoint.png").write_bytes(paths[0].read_bytes())
    assert [f.name for f in D.image_files(first)] == ["digit0.png"]
    rc, out, err = run_cli(capsys, "predict", tmp_path / "val", "--checkpoint", run_dir, "--top-k", "1")
    assert rc == 0 and sorted(ln for ln in out.splitlines() if not ln.startswith(" ")) == \
        sorted(str(tmp_path / "val" / str(y) / p.name) for p, y in zip(paths, labels)), (out, err)
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", tmp_path, "--json", "--workers", "0")
    assert rc == 0 and json.loads(out)["images"] == 2


def test_predict_runs_in_batches_and_skips_unreadable_files_found_in_a_folder(run_dir, tmp_path, capsys):
    """--batch-size 2 over 5 images prints what one batch prints; a broken file found in a folder is a
    warning, the same file named on the command line an error."""
    paths, _ = digit_pngs(tmp_path / "imgs", 5)
    rc, whole, _ = run_cli(capsys, "predict", tmp_path / "imgs", "--checkpoint", run_dir, "--batch-size", "64")
    rc2, chunked, _ = run_cli(capsys, "predict", tmp_path / "imgs", "--checkpoint", run_dir, "--batch-size", "2")
    assert rc == rc2 == 0 and whole == chunked and whole.count("\n") == 5 * 6
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    rc, out, err = run_cli(capsys, "predict", tmp_path / "imgs", "--checkpoint", run_dir, "--batch-size", "2")
    assert rc == 0 and out == whole and "skipped unreadable image" in err and "broken.png" in err
    rc, _, err = run_cli(capsys, "predict", tmp_path / "imgs" / "broken.png", "--checkpoint", run_dir)
    assert rc == 2 and "Could not read image" in err


def test_eval_refuses_unreadable_data_and_folders_not_named_as_the_runs_classes(run_dir, tmp_path, capsys):
    """A folder where no image can be read is an error, not 0.00%; folders named otherwise ("zero",
    "one", ...) than a run's classes ("0", "1", ...) would be labelled by their sorted order (eight = 0,
    five = 1, ...): refused for a run."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths, labels = digit_pngs(tmp_path / "src", 10)
    for p, y in zip(paths, labels):
        (tmp_path / "named" / words[y]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "named" / words[y] / p.name).write_bytes(p.read_bytes())
        (tmp_path / "bad" / str(y)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / str(y) / p.name).write_bytes(b"garbage")
    for name in words:  # every class present
        (tmp_path / "named" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "named" / name / "x.png").write_bytes(paths[0].read_bytes())
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", tmp_path / "named", "--workers", "0")
    assert rc == 2 and "No class folder" in err and "named as one of the checkpoint's classes" in err
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", tmp_path / "bad", "--workers", "0")
    assert rc == 2 and out == "" and "None of the" in err and "could be read" in err


def test_eval_reads_the_runs_data_root_from_any_folder(run_dir, tmp_path, monkeypatch):
    """The run records absolute data paths; `swin eval RUN` elsewhere uses them and makes no ./data."""
    from swin.cli import _run_data

    data, root = _run_data(str(run_dir))
    assert data == "digits" and Path(root).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    assert not (tmp_path / "data").exists()
    assert D.absolute_data("cifar10") == "cifar10" and D.absolute_data("imgs") == str(tmp_path / "imgs")


def test_bench_refuses_a_cuda_graph_without_cuda():
    from swin import bench

    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", "--impls", "ours,ours+graph"])
    assert e.value.code == 2


def test_convert_of_a_run_uses_its_architecture(tmp_path, capsys):
    """The demo model's last stage is 2 x 2 under a window of 4: timm sizes that block's bias table for a
    2 x 2 window. `swin convert RUN --to timm` reads the run's architecture (no --model), and the file
    loads into timm's model strictly with the same logits."""
    timm = pytest.importorskip("timm")
    assert cli.main(["train", "--max-steps", "1", "--threads", "1", "--no-progress", "--device", "cpu",
                     "--out-dir", str(tmp_path / "runs"), "--name", "demo"]) == 0
    rc, out, err = run_cli(capsys, "convert", tmp_path / "runs" / "demo", tmp_path / "t.safetensors", "--to", "timm")
    assert rc == 0, err
    from safetensors.torch import load_file

    from swin.train import load_for_inference

    c = swin.get_config("swin_micro_p4")
    ref = timm.models.swin_transformer.SwinTransformer(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depths=c.depths,
        num_heads=c.num_heads, window_size=c.window_size, num_classes=c.num_classes).eval()
    ref.load_state_dict(load_file(str(tmp_path / "t.safetensors")), strict=True)
    assert ref.layers[2].blocks[0].attn.relative_position_bias_table.shape[0] == 9  # a 2 x 2 window
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = load_for_inference(tmp_path / "runs" / "demo").model(x), ref(x)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


def test_library_warnings_are_one_cli_line(tmp_path, capsys):
    """A warning of the library's own (here: a detector's neck dropped on conversion) prints as one
    `warning: ...` line like the CLI's others, without Python's file:line header and source line."""
    import swin

    sd = {"backbone." + k: v for k, v in swin.create_model("swin_micro_p4", num_classes=0).state_dict().items()}
    sd["neck.lateral.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "det.pth")
    rc, _, err = run_cli(capsys, "convert", tmp_path / "det.pth", tmp_path / "out.pth", "--to", "timm",
                         "--model", "swin_micro_p4")
    assert rc == 0
    assert "warning: Dropped 1 key(s) of the detector/segmentor" in err and "UserWarning" not in err
    assert "convert.py" not in err
