"""The Trainer: a real short run, exact resume, SIGKILL/SIGTERM/SIGINT, non-finite loss, skipped
images, DDP equal to one process, and the recipe pieces (param groups, schedule, EMA)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import swin
from swin.train import (NonFiniteLossError, TrainConfig, Trainer, lr_at, param_groups, small)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}  # patch 4, window 4: 8x8 then 4x4 tokens


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(data="digits", model="swin_micro_p4", model_overrides=TINY, out_dir=str(tmp_path / "runs"),
                batch_size=64, epochs=2, log_every=1, progress=False, threads=1, lr=4e-2, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base, base=small())


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def env_for_subprocess() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("WORLD_SIZE", None)
    return env


def test_short_real_run_learns_and_writes_the_run(tmp_path):
    """The demo's model and recipe (small preset), 2 of its epochs: the loss falls, val top-1 >> chance."""
    cfg = TrainConfig.from_dict(dict(out_dir=str(tmp_path / "runs"), epochs=2, log_every=1, progress=False,
                                     threads=1, device="cpu"), base=small())
    summary = Trainer(cfg).fit()
    run = Path(summary["run_dir"])
    steps = losses(run)
    first, last = sum(list(steps.values())[:5]) / 5, sum(list(steps.values())[-5:]) / 5
    assert len(steps) == 2 * 22 and last < 0.7 * first, (first, last)
    assert summary["status"] == "finished" and summary["val_top1"] > 50.0  # 10 classes: chance is 10%
    files = {"config.yaml", "metrics.jsonl", "best.pt", "summary.json", "ckpt-0000044.pt"}
    assert {p.name for p in run.iterdir()} >= files
    assert json.loads((run / "summary.json").read_text())["step"] == 44
    ckpt = torch.load(run / "ckpt-0000044.pt", weights_only=True)  # everything loads weights-only
    assert ckpt["epoch"] == 2 and ckpt["step"] == 44 and set(ckpt) >= {"optimizer", "scheduler", "scaler", "ema", "rng"}
    assert len(list(run.glob("ckpt-*.pt"))) <= cfg.keep_last
    # a second run of the same name gets a new folder; nothing is overwritten
    again = Trainer(cfg)
    assert again.run_dir.name == run.name + "-2"


def test_resume_is_exact(tmp_path):
    """2 epochs straight == 1 epoch, stop, resume, 1 epoch (EMA, MixUp/CutMix, drop path all on)."""
    kw = dict(ema=True, ema_decay=0.9, mixup=0.8, cutmix=1.0, drop_path=0.1, rand_augment=9, reprob=0.25)
    straight = Trainer(tiny_cfg(tmp_path, name="straight", **kw))
    straight.fit()
    first = Trainer(tiny_cfg(tmp_path, name="split", max_steps=22, **kw))
    assert first.fit()["status"] == "max_steps"
    second = Trainer(tiny_cfg(tmp_path, name="split", **kw), resume=first.run_dir)
    assert second.step == 22
    second.fit()
    a, b = losses(straight.run_dir), losses(second.run_dir)
    assert a.keys() == b.keys() and len(a) == 44
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6
    for (n, p), q in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), n
    for p, q in zip(straight.ema.module.state_dict().values(), second.ema.module.state_dict().values()):
        assert torch.equal(p, q)


def test_pretrained_run_folder_is_read_and_a_resume_does_not_read_it_again(tmp_path):
    """--pretrained RUN_DIR starts from the run's best.pt (here, stopped in epoch 1, its latest ckpt, as
    `swin eval` reads it); a resumed run needs its own checkpoint only."""
    from swin.train import run_weights

    source = Trainer(tiny_cfg(tmp_path, name="source", max_steps=3))
    source.fit()
    assert run_weights(source.run_dir).name == "ckpt-0000003.pt"
    from swin.cli import _run_data

    # `swin eval --checkpoint RUN_DIR` needs no --data, from any folder (the run keeps data_root absolute)
    assert _run_data(str(source.run_dir)) == ("digits", str(Path(source.cfg.data_root).absolute()))
    assert Path(source.cfg.data_root).is_absolute()
    best = torch.load(run_weights(source.run_dir), map_location="cpu", weights_only=True)["model"]
    assert not torch.equal(best["head.weight"], Trainer(tiny_cfg(tmp_path, name="x")).model.head.weight)
    ft = Trainer(tiny_cfg(tmp_path, name="ft", pretrained=str(source.run_dir), max_steps=2))
    for name, p in ft.model.state_dict().items():
        assert torch.equal(p, best[name]), name
    ft.fit()
    for f in source.run_dir.iterdir():  # the pre-trained weights are gone: resuming must not need them
        f.unlink()
    resumed = Trainer(tiny_cfg(tmp_path, name="ft", pretrained=str(source.run_dir), max_steps=4), resume=ft.run_dir)
    assert resumed.step == 2


def test_eval_crop_follows_the_official_configs():
    """0.875 below 384 px; none at 384 (the official 384 configs' TEST.CROP: False, timm's crop_pct 1.0)."""
    from swin import data as D
    from swin.train import finetune

    assert [D.default_eval_crop(s) for s in (224, 256, 383, 384, 512)] == [0.875, 0.875, 0.875, 1.0, 1.0]
    assert [D.default_eval_crop(s) for s in (16, 32, 33)] == [1.0, 1.0, 0.875]  # official: no resize at <= 32 px
    ft = finetune()
    assert ft.drop_path == 0.5 and ft.eval_crop == 0  # swin_base_patch4_window12_384_finetune.yaml
    assert TrainConfig().eval_crop == 0 and small().eval_crop == 1.0


def test_foreign_checkpoint_eval_crop_by_size(tmp_path):
    from swin.train import load_for_inference

    path = tmp_path / "foreign.pth"
    torch.save(swin.create_model("swin_micro_p4").state_dict(), path)
    assert load_for_inference(path, model="swin_micro_p4", img_size=224).eval_crop == 0.875
    assert load_for_inference(path, model="swin_micro_p4", img_size=384).eval_crop == 1.0


def _train_cmd(tmp_path, name, *extra):
    return [sys.executable, "-m", "swin", "train", "--data", "digits", "--model", "swin_micro_p4",
            "--out-dir", str(tmp_path / "runs"), "--name", name, "--epochs", "20", "--batch-size", "64",
            "--log-every", "1", "--no-progress", "--threads", "1", "--device", "cpu", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_sigkill_mid_epoch_then_resume_matches_straight_run(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "killed", "--save-every", "5", "--max-steps", "30"),
                            env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "runs" / "killed"
    _wait_for(run / "ckpt-0000010.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(run.glob(".*tmp*"))  # no half-written files left behind
    cfg = TrainConfig.from_dict(dict(data="digits", model="swin_micro_p4", epochs=20, batch_size=64, log_every=1,
                                     save_every=5, max_steps=30, progress=False, threads=1, device="cpu",
                                     out_dir=str(tmp_path / "runs")), base=small())
    resumed = Trainer(cfg, resume=run)
    assert resumed.step >= 10 and resumed.step % 5 == 0 and resumed.step_in_epoch == resumed.step % 22
    resumed.fit()
    straight = Trainer(TrainConfig.from_dict(dict(name="straight"), base=cfg))
    straight.fit()
    a, b = losses(straight.run_dir), losses(run)
    assert a.keys() == b.keys() and len(a) == 30
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_sigterm_finish_the_step_save_and_exit_0(tmp_path, sig):
    name = f"sig{int(sig)}"
    proc = subprocess.Popen(_train_cmd(tmp_path, name, "--set", "model_overrides={embed_dim: 16}"),
                            env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / name
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{sig.name} received" in out and "Continue with: swin train --resume" in out
    ckpts = sorted(run.glob("ckpt-*.pt"))
    assert len(ckpts) == 1
    step = torch.load(ckpts[0], weights_only=True)["step"]
    assert 1 <= step < 20 * 22 and max(losses(run)) == step  # the step it was on was finished and saved


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    class Exploding(Trainer):
        def forward_loss(self, x, y):
            loss = super().forward_loss(x, y)
            return loss * float("nan") if self.step == 4 else loss  # the 5th step

    t = Exploding(tiny_cfg(tmp_path, save_every=3))
    with pytest.raises(NonFiniteLossError, match="at step 5 "):
        t.fit()
    ckpts = sorted(t.run_dir.glob("ckpt-*.pt"))
    assert [c.name for c in ckpts] == ["ckpt-0000003.pt"]
    good = torch.load(ckpts[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # the bad step never updated the weights
    assert t.step == 4
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "non_finite" and summary["step"] == 4
    # the CLI says it in one line and exits 1
    from swin import cli

    class Boom:
        def __init__(self, *a, **k):
            pass

        def fit(self):
            raise NonFiniteLossError("The loss became nan at step 7 (epoch 1).")

        def close(self):
            pass

    import swin.train as st

    orig = st.Trainer
    st.Trainer = Boom
    try:
        assert cli.main(["train", "--out-dir", str(tmp_path / "r2")]) == 1
    finally:
        st.Trainer = orig


def test_corrupt_images_are_skipped_and_counted_with_worker_processes(tmp_path, capsys):
    from test_data import write_folder

    root = write_folder(tmp_path / "ds", per_class=8, size=36)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "val" / "dog" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cfg = tiny_cfg(tmp_path, data=str(root), epochs=2, batch_size=4, workers=2, img_size=32, eval_crop=0.875,
                   hflip=0.5, rand_augment=9, reprob=0.25)
    summary = Trainer(cfg).fit()
    assert summary["status"] == "finished" and summary["skipped_images"] == 2
    assert sorted(Path(p).name for p in summary["skipped_files"]) == ["broken.jpg", "truncated.png"]
    err = capsys.readouterr().err
    assert err.count("warning: skipped unreadable image") == 2  # once per file, one line each


_PORT_RACE = ("Address already in use", "EADDRINUSE", "DistNetworkError", "failed to listen", "RendezvousConnectionError",
              "Connection reset by peer", "Connection refused")


def _torchrun(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "swin", "train",
           *map(str, args)]
    for attempt in range(2):
        r = subprocess.run(cmd, env=env_for_subprocess(), capture_output=True, text=True, timeout=timeout)
        # --standalone picks a free port, closes it and binds it again: another process on a shared
        # machine can take it in between. Only that (a network error, not ours) is retried, once.
        if r.returncode == 0 or not any(s in r.stderr for s in _PORT_RACE):
            break
    if r.returncode:
        print(r.stderr[-8000:])  # shown whole under "Captured stdout" (the assertion message is cut)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def test_ddp_resume_is_exact_with_drop_path_and_survives_an_unreadable_micro_batch(tmp_path):
    """Two processes with drop path (each rank draws its own masks): stopped at step 2 and resumed, the
    weights at step 4 equal an uninterrupted run's (each rank's random state is in the checkpoint; it
    was rank 0's only: 3e-3 off). Then a folder where one rank's micro-batch is one unreadable image:
    that rank takes a zero-weighted stand-in through DDP's all-reduce instead of hanging the other."""
    from test_data import write_folder

    common = ["--data", "digits", "--model", "swin_micro_p4",
              "--set", "model_overrides={embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}",
              "--batch-size", "32", "--epochs", "1", "--drop-path", "0.3", "--lr", "1e-3", "--warmup-epochs", "0",
              "--no-progress", "--device", "cpu", "--log-every", "1", "--out-dir", tmp_path / "runs"]
    _torchrun([*common, "--max-steps", "4", "--name", "straight"])
    _torchrun([*common, "--max-steps", "2", "--name", "resumed"])
    _torchrun(["--resume", tmp_path / "runs/resumed", "--max-steps", "4", "--no-progress"])
    a = torch.load(tmp_path / "runs/straight/ckpt-0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/resumed/ckpt-0000004.pt", weights_only=True)
    assert len(a["rng_ranks"]) == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    root = write_folder(tmp_path / "ds", per_class=2, size=36)
    (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")  # truncated
    r = _torchrun(["--data", root, "--model", "swin_micro_p4", "--img-size", "32", "--batch-size", "2",
                   "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--device", "cpu",
                   "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--out-dir", tmp_path / "runs", "--name", "skip"],
                  timeout=150)
    summary = json.loads((tmp_path / "runs/skip/summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_images"] == 1 and "Done:" in r.stdout


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    common = ["--data", "digits", "--model", "swin_micro_p4",
              "--set", "model_overrides={embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}",
              "--batch-size", "32", "--epochs", "1", "--max-steps", "4", "--drop-path", "0", "--mixup", "0",
              "--cutmix", "0", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress", "--device", "cpu",
              "--log-every", "1", "--out-dir", str(tmp_path / "runs")]
    r = _torchrun([*common, "--name", "ddp"])
    assert r.stdout.count("Training swin_micro_p4") == 1  # rank-0 logging only
    from swin import cli

    assert cli.main(["train", *common, "--name", "single", "--threads", "1"]) == 0
    a = torch.load(tmp_path / "runs/ddp/ckpt-0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/single/ckpt-0000004.pt", weights_only=True)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff <= 1e-5, diff
    la, lb = losses(tmp_path / "runs/ddp"), losses(tmp_path / "runs/single")
    assert max(abs(la[k] - lb[k]) for k in la) <= 1e-5


def test_param_groups_no_decay_and_layer_decay():
    model = swin.create_model("swinv2_micro", num_classes=10)
    groups = param_groups(model, 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    for n in plain:
        p = dict(model.named_parameters())[n]
        assert p.ndim <= 1 or "cpb_mlp" in n or "logit_scale" in n
    assert any("cpb_mlp.0.weight" in n for n in plain) and any(n.endswith("q_bias") for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    v1 = swin.create_model("swin_micro")
    assert any("relative_position_bias_table" in n for g in param_groups(v1, 0.05) if g["weight_decay"] == 0
               for n in g["names"])
    ld = param_groups(v1, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in ld for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["patch_embed.proj.weight"] == 0.5 ** 7
    assert scale["layers.0.blocks.1.mlp.fc1.weight"] == 0.5 ** 5 and scale["layers.2.blocks.1.norm1.weight"] == 0.5


def test_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1e-3, 1e-6, 1e-5) == 1e-6
    assert math.isclose(lr_at(5, 100, 10, 1e-3, 1e-6, 1e-5), 1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, 100, 10, 1e-3, 1e-6, 1e-5) == 1e-3
    assert math.isclose(lr_at(55, 100, 10, 1e-3, 1e-6, 1e-5), (1e-3 + 1e-5) / 2)
    assert math.isclose(lr_at(100, 100, 10, 1e-3, 1e-6, 1e-5), 1e-5)


def test_bad_inputs_raise_before_any_work(tmp_path):
    cases = [
        (dict(data=str(tmp_path / "missing")), FileNotFoundError, "does not exist"),
        (dict(num_classes=5), ValueError, "labels 5..9 would be out of range"),
        (dict(img_size=6), ValueError, "too small for swin_micro_p4: it needs at least 8"),
        (dict(batch_size=4096), ValueError, "larger than the 1437 training images"),
        (dict(batch_size=63, accum_steps=2), ValueError, "divisible"),
        (dict(model="swin_mikro"), ValueError, "Did you mean"),
        (dict(data=""), ValueError, "No data given"),
        (dict(compile="fast"), ValueError, "compile must be one of off, default, reduce-overhead"),
        (dict(compile="reduce-overhead", batch_size=64, accum_steps=2), ValueError, "needs one process and accum_steps=1"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            Trainer(tiny_cfg(tmp_path, **kw))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(ValueError, match="Unknown training option"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        Trainer(tiny_cfg(tmp_path), resume=tmp_path / "nope.pt")


def test_compiled_training_follows_the_eager_run(tmp_path):
    """--compile default: the same losses as eager training, step by step, within compile's rounding;
    the checkpoint is the plain module's (no _orig_mod prefix) and loads into a fresh model."""
    runs = {}
    for mode in ("off", "default"):
        torch._dynamo.reset()
        cfg = tiny_cfg(tmp_path, compile=mode, max_steps=4, name=f"c-{mode}")
        trainer = Trainer(cfg)
        assert isinstance(trainer.train_net, torch._dynamo.eval_frame.OptimizedModule) == (mode != "off")
        summary = trainer.fit()
        runs[mode] = Path(summary["run_dir"])
    eager, compiled = losses(runs["off"]), losses(runs["default"])
    assert list(eager) == list(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert abs(eager[step] - compiled[step]) <= 1e-3 * abs(eager[step]), (step, eager[step], compiled[step])
    assert eager[4] != eager[1]  # the weights moved: later steps compare trained weights
    state = torch.load(next(runs["default"].glob("ckpt-*.pt")), weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)


def test_resume_at_max_steps_trains_nothing_and_summary_keeps_the_last_validation(tmp_path):
    """A run stopped by max_steps, resumed with the same limit, takes no step (it took one more);
    resumed further, its summary still has the last epoch's validation (it had None)."""
    first = Trainer(tiny_cfg(tmp_path, name="r", epochs=3, max_steps=23))  # 22 steps per epoch: one val
    first.fit()
    val = first.last_val
    assert first.step == 23 and val and (first.run_dir / "ckpt-0000023.pt").is_file()
    again = Trainer(tiny_cfg(tmp_path, name="r", epochs=3, max_steps=23), resume=first.run_dir)
    again.fit()
    assert again.step == 23 and not (first.run_dir / "ckpt-0000024.pt").exists()
    more = Trainer(tiny_cfg(tmp_path, name="r", epochs=3, max_steps=25), resume=first.run_dir)
    summary = more.fit()
    assert more.step == 25 and summary["status"] == "max_steps"
    assert summary["val_top1"] == val["top1"] and summary["val_loss"] == val["loss"]


def test_pick_device_refuses_unknown_and_absent_devices():
    from swin.train import pick_device

    assert pick_device("cpu").type == "cpu"
    for bad in ("gpu", "CPU", "mps", "meta", "tpu", "cuda:x"):
        with pytest.raises(ValueError, match="Unknown device"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            pick_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_compile_for_inference_checks_its_arguments_before_touching_the_model():
    import swin
    from swin.ops import compile_for_inference

    model = swin.create_model("swin_micro_p4", num_classes=10).train()
    with pytest.raises(ValueError, match="Unknown mode 'turbo'"):
        compile_for_inference(model, torch.randn(1, 3, 32, 32), mode="turbo")
    for example, got in ((None, "NoneType"), (torch.randn(3, 32, 32), "3-D tensor")):
        with pytest.raises(ValueError, match=got):
            compile_for_inference(model, example)
    assert model.training  # untouched by the refused calls
    assert compile_for_inference(model, torch.randn(1, 3, 32, 32), mode="eager") is model and not model.training


def test_a_warmup_longer_than_the_run_is_refused(tmp_path):
    """The imagenet preset (20 warm-up epochs) run for 10: the lr would rise for the whole run."""
    with pytest.raises(ValueError, match="warmup_epochs 20 is more than epochs 10"):
        Trainer(tiny_cfg(tmp_path, epochs=10, warmup_epochs=20))
    Trainer(tiny_cfg(tmp_path, epochs=2, warmup_epochs=2))  # a run of warm-up alone is asked for plainly


def test_resuming_an_older_checkpoint_sets_the_later_files_aside(tmp_path, recwarn):
    """--resume RUN/ckpt-5 of a run that got to step 15: ckpt-10/15 and the metrics of steps 6-15 move
    to after-step-0000005/ (nothing deleted), so that the next --resume RUN continues the new branch;
    a metrics line cut off by a kill is dropped, not a crash; `swin plot` before any validation is quiet."""
    from swin.cli import main as cli_main
    from swin.train import latest_checkpoint

    first = Trainer(tiny_cfg(tmp_path, name="b", save_every=5, keep_last=10, max_steps=15))
    first.fit()
    run = first.run_dir
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-0000005.pt", "ckpt-0000010.pt", "ckpt-0000015.pt"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "epoch": 0.72, "lo')  # killed mid-line
    assert cli_main(["plot", str(run)]) == 0
    assert not [w for w in recwarn if "legend" in str(w.message)]
    branch = Trainer(tiny_cfg(tmp_path, name="b", save_every=5, keep_last=10, max_steps=7), resume=run / "ckpt-0000005.pt")
    aside = run / "after-step-0000005"
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-0000010.pt", "ckpt-0000015.pt", "metrics.jsonl"]
    assert [json.loads(ln)["step"] for ln in (aside / "metrics.jsonl").read_text().splitlines()] == list(range(6, 16))
    assert max(losses(run)) == 5
    branch.fit()
    assert latest_checkpoint(run).name == "ckpt-0000007.pt" and max(losses(run)) == 7
    assert Trainer(tiny_cfg(tmp_path, name="b", save_every=5, keep_last=10, max_steps=9), resume=run).step == 7


def test_max_steps_at_an_epochs_end_still_evaluates_it(tmp_path):
    """22 steps per epoch; --max-steps 22 ends the epoch first: validated, best.pt written."""
    summary = Trainer(tiny_cfg(tmp_path, name="m", max_steps=22)).fit()
    run = Path(summary["run_dir"])
    assert summary["status"] == "max_steps" and summary["epochs_done"] == 1 and summary["val_top1"] is not None
    assert (run / "best.pt").is_file() and any("val_top1" in ln for ln in (run / "metrics.jsonl").read_text().splitlines())


def test_config_values_a_user_types(tmp_path, monkeypatch):
    """A fractional warm-up; paths recorded absolute and normalised (a config.yaml reused from anywhere);
    model_overrides cannot set what training options set; `--set name=` clears a text option."""
    from swin import data as D

    cfg = TrainConfig.from_dict({"warmup_epochs": 0.5})
    assert cfg.warmup_epochs == 0.5
    assert TrainConfig.from_dict({"pretrained": None}).pretrained == ""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert D.absolute_data("sub/../sub") == str(tmp_path / "sub") and D.absolute_data("digits") == "digits"
    source = Trainer(tiny_cfg(tmp_path, name="src", max_steps=1))
    source.fit()
    ft = Trainer(tiny_cfg(tmp_path, name="ft", pretrained=os.path.relpath(source.run_dir), warmup_epochs=0.5))
    assert ft.cfg.pretrained == str(source.run_dir)
    assert ft.scheduler.lr_lambdas[0](11) == pytest.approx(1.0)  # 0.5 x 22 steps of warm-up, then the peak
    for key, flag in (("drop_path_rate", "--drop-path"), ("img_size", "--img-size"), ("num_classes", "--num-classes")):
        with pytest.raises(ValueError, match=f"model_overrides cannot set {key}: use {flag}"):
            Trainer(tiny_cfg(tmp_path, model_overrides={**TINY, key: 1}))
