"""Checkpoint interop: key schemes, detection, round trips, mmdet patch-merging order, load_checkpoint."""
from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import swin
from swin.convert import (FORMATS, convert_state_dict, detect_format, load_checkpoint, read_checkpoint,
                          save_state_dict)
from swin.model import PatchMerging

TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def tiny(version: int = 1, window: int = 4, num_classes: int = 10, **kw) -> swin.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t_w8"
    return swin.create_model(name, num_classes=num_classes, window_size=window, drop_path_rate=0.0,
                             **{**TINY, **kw}).eval()


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim <= 1 or "logit_scale" in name else 0.02))
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------
# Round trips and detection
# ------------------------------------------------------------------------------------------
WRITES = [(fmt, None) for fmt in FORMATS if fmt != "hf"] + [("hf", 4), ("hf", 5)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt,hf_version", WRITES, ids=[f"{f}{v or ''}" for f, v in WRITES])
def test_round_trip_is_identity_and_format_is_detected(version, fmt, hf_version):
    sd = randomized(tiny(version)).state_dict()
    out = convert_state_dict(sd, dst=fmt, hf_version=hf_version, window_size=4)
    assert detect_format(out) == fmt
    assert_same_state(convert_state_dict(out), sd)  # auto-detected read
    assert_same_state(convert_state_dict(out, src=fmt), sd)  # named read


def test_detection_tells_v1_from_v2_and_hf_versions():
    from swin.convert import _inspect

    for version in (1, 2):
        sd = tiny(version).state_dict()
        for fmt in FORMATS:
            info = _inspect(convert_state_dict(sd, dst=fmt, hf_version=4, window_size=4))
            assert (info.fmt, info.version) == (fmt, version)
    v1 = tiny(1).state_dict()
    assert _inspect(convert_state_dict(v1, dst="hf", hf_version=4)).hf_version == 4
    assert _inspect(convert_state_dict(v1, dst="hf", hf_version=5)).hf_version == 5


# REFERENCE.md: transformers 4.x V1 names vs 5.x.
HF5_TO_HF4 = [
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.relative_position_bias\.relative_position_bias_table$",
     ".attention.self.relative_position_bias_table"),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def test_hf4_names_made_by_renaming_hf5_names_are_read():
    sd = randomized(tiny(1)).state_dict()
    hf5 = convert_state_dict(sd, dst="hf", hf_version=5)
    hf4 = {}
    for k, v in hf5.items():
        for pattern, repl in HF5_TO_HF4:
            k = re.sub(pattern, repl, k)
        hf4[k] = v
    assert any(".attention.self.query." in k for k in hf4) and not any("q_proj" in k for k in hf4)
    assert detect_format(hf4) == "hf"
    assert_same_state(convert_state_dict(hf4), sd)
    # Our 4.x writer produces exactly these names plus the (N, N) index buffers 4.x saved.
    written = convert_state_dict(sd, dst="hf", hf_version=4)
    assert sorted(k for k in written if not k.endswith("relative_position_index")) == sorted(hf4)
    n_blocks = sum(TINY["depths"])
    assert sum(k.endswith("attention.self.relative_position_index") for k in written) == n_blocks


def test_hf_default_writes_installed_transformers_layout():
    transformers = pytest.importorskip("transformers")
    major = int(transformers.__version__.split(".")[0])
    written = convert_state_dict(tiny(1).state_dict(), dst="hf")
    assert any((".attention.q_proj." if major >= 5 else ".attention.self.query.") in k for k in written)


def test_wrappers_and_nesting_are_unwrapped():
    model = randomized(tiny(1))
    sd = model.state_dict()
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    ddp = {"module." + k: v for k, v in sd.items()}
    for ckpt in ({"model": sd, "ema": ema, "epoch": 3}, {"state_dict": ddp}, {"model_state": sd},
                 {"state_dict_ema": sd}, {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
                 {"model." + k: v for k, v in sd.items()}, {"backbone." + k: v for k, v in sd.items()},
                 {"_orig_mod.module." + k: v for k, v in sd.items()},  # torch.compile(DDP(model))
                 {"model.module." + k: v for k, v in sd.items()}, model):
        assert_same_state(convert_state_dict(ckpt), sd)
    timm_nested = {"state_dict": {"module." + k: v for k, v in convert_state_dict(sd, dst="timm").items()}}
    assert detect_format(timm_nested) == "timm"
    assert_same_state(convert_state_dict(timm_nested), sd)


def test_official_write_has_the_official_buffers():
    config = tiny(1, window=7).config  # 224: maps 56, 28, 14, 7 (the last one is a single window)
    sd = tiny(1, window=7).state_dict()
    off = convert_state_dict(sd, dst="official", config=config)
    M = 7
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = (rel[..., 0] + M - 1) * (2 * M - 1) + rel[..., 1] + M - 1  # official formula
    for i, depth in enumerate(TINY["depths"]):
        for j in range(depth):
            assert torch.equal(off[f"layers.{i}.blocks.{j}.attn.relative_position_index"], index)
            H = 224 // 4 // 2**i
            has_mask = j % 2 == 1 and H > M
            assert (f"layers.{i}.blocks.{j}.attn_mask" in off) == has_mask
            if has_mask:
                assert torch.equal(off[f"layers.{i}.blocks.{j}.attn_mask"], official_mask(H, H, M, M // 2))
    assert detect_format(off) == "official"
    assert_same_state(convert_state_dict(off), sd)
    # Without a config the masks (which depend on the training size) are left out.
    assert not any(k.endswith("attn_mask") for k in convert_state_dict(sd, dst="official"))


def official_mask(H: int, W: int, M: int, s: int) -> torch.Tensor:
    img_mask = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for w in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    windows = img_mask.view(1, H // M, M, W // M, M, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def test_official_v2_buffers_use_the_pretrained_window():
    model = tiny(2, window=8, pretrained_window_sizes=(6, 6, 6, 0))
    off = convert_state_dict(model.state_dict(), dst="official", config=model.config)
    table = off["layers.0.blocks.0.attn.relative_coords_table"]
    assert table.shape == (1, 15, 15, 2)
    # corner offset 7 normalised by (6 - 1), times 8, log-spaced
    expected = torch.sign(torch.tensor(-7 / 5 * 8)) * torch.log2(torch.tensor(7 / 5 * 8) + 1) / 3
    assert torch.allclose(table[0, 0, 0, 0], expected)
    last = off["layers.3.blocks.0.attn.relative_coords_table"]
    assert torch.allclose(last[0, 0, 0, 0], -torch.log2(torch.tensor(9.0)) / 3)  # (7 / 7) * 8


# ------------------------------------------------------------------------------------------
# mmdet / mmseg / mmpretrain
# ------------------------------------------------------------------------------------------
class UnfoldPatchMerging(nn.Module):
    """mmcv's PatchMerging as mmdet/mmpretrain run it: nn.Unfold(2, stride 2), then norm/reduction."""

    def __init__(self, dim: int, post_norm: bool):
        super().__init__()
        self.post_norm = post_norm
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if post_norm else 4 * dim)

    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        x = self.sampler(x.permute(0, 3, 1, 2))  # (B, 4C, L), channels in (c, kh, kw) order
        x = x.transpose(1, 2).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(self.reduction(x)) if self.post_norm else self.reduction(self.norm(x))


@pytest.mark.parametrize("version", [1, 2])
def test_mmdet_patch_merging_order_matches_nn_unfold(version):
    """Our writer's permutation makes mmcv's Unfold-based merging compute what the official concat does."""
    C = 8
    ours = randomized(PatchMerging(C, version), seed=1)
    sd = {f"layers.0.downsample.{k}": v for k, v in ours.state_dict().items()}
    mm = convert_state_dict({**sd, **_dummy_block_keys(version)}, src="swin", dst="mmdet")
    theirs = UnfoldPatchMerging(C, post_norm=version == 2)
    stage = 1 if version == 2 else 0  # mmpretrain V2 merges at the start of the next stage
    theirs.load_state_dict({k: mm[f"backbone.stages.{stage}.downsample.{k}"] for k in theirs.state_dict()})
    x = torch.randn(2, 6, 10, C)
    diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-6
    # and the unpermuted weights do not (the permutation is not a no-op)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()})
    assert (ours(x) - theirs(x)).abs().max().item() > 1e-3


def _dummy_block_keys(version: int) -> dict:
    # a block so that the dict looks like a Swin checkpoint of the right version
    key = "attn.relative_position_bias_table" if version == 1 else "attn.logit_scale"
    return {f"layers.0.blocks.0.{key}": torch.zeros(49, 1) if version == 1 else torch.zeros(1, 1, 1)}


def mmdet_from_formula(sd: dict) -> dict:
    """A V1 mmdet detector checkpoint, written from the REFERENCE formula (not from swin.convert)."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("layers.", "stages.").replace("patch_embed.proj", "patch_embed.projection")
        k2 = k2.replace(".attn.", ".attn.w_msa.")
        k2 = k2.replace("mlp.fc1", "ffn.layers.0.0").replace("mlp.fc2", "ffn.layers.1")
        if k.endswith("downsample.reduction.weight"):
            o, c4 = v.shape
            v = v.reshape(o, 4, c4 // 4)[:, [0, 2, 1, 3]].transpose(1, 2).reshape(o, c4)
        elif k.endswith("downsample.norm.weight") or k.endswith("downsample.norm.bias"):
            v = v.reshape(4, -1)[[0, 2, 1, 3]].transpose(0, 1).reshape(-1)
        if k.startswith("norm."):
            k2 = "norm3." + k.split(".")[1]
        if k.startswith("head."):
            continue
        out["backbone." + k2] = v
    out["backbone.norm0.weight"] = torch.ones(32)  # detection output norms of earlier stages
    out["neck.fpn_convs.0.conv.weight"] = torch.zeros(4, 4, 3, 3)
    out["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 16)
    return {"meta": {"mmdet_version": "3.0"}, "state_dict": out}


def test_mmdet_detector_checkpoint_reads_to_the_same_logits():
    src = randomized(tiny(1), seed=3)
    ckpt = mmdet_from_formula(src.state_dict())
    assert detect_format(ckpt) == "mmdet"
    dst = tiny(1)
    with pytest.warns(UserWarning) as record:
        result = load_checkpoint(dst, ckpt)
    messages = " ".join(str(w.message) for w in record)
    assert "neck.fpn_convs" in messages and "out_norms=True" in messages  # dropped, with a warning
    assert "no classifier head" in messages
    assert result.missing_keys == ["head.weight", "head.bias"] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(dst.forward_features(X), src.forward_features(X))
    # the writer produces the same tensors as the formula
    written = convert_state_dict(src.state_dict(), dst="mmdet")
    for k, v in ckpt["state_dict"].items():
        if k.startswith("backbone.") and k != "backbone.norm0.weight":
            assert torch.equal(written[k], v), k


def test_mmpretrain_v2_layout_round_trips_with_merging_at_stage_start():
    sd = randomized(tiny(2), seed=4).state_dict()
    mm = convert_state_dict(sd, dst="mmdet")
    assert "backbone.stages.1.downsample.reduction.weight" in mm
    assert not any(k.startswith("backbone.stages.0.downsample") for k in mm)
    assert "head.fc.weight" in mm and "backbone.norm3.weight" in mm
    assert_same_state(convert_state_dict(mm), sd)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_errors_name_the_format_and_the_keys():
    sd = tiny(1).state_dict()
    timm_sd = convert_state_dict(sd, dst="timm")
    timm_sd["layers.2.blocks.0.attn.extra_thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'timm'.*layers\.2\.blocks\.0\.attn\.extra_thing"):
        convert_state_dict(timm_sd)
    with pytest.raises(ValueError, match=r"Cannot tell.*bert\.embeddings"):
        convert_state_dict({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="Unknown target format 'keras'"):
        convert_state_dict(sd, dst="keras")
    with pytest.raises(ValueError, match="window size"):
        convert_state_dict(tiny(2).state_dict(), dst="torchvision")
    hf = convert_state_dict(sd, dst="hf", hf_version=5)  # 5.x names whichever transformers is installed
    del hf["swin.encoder.layers.0.blocks.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match=r"'hf'.*layers\.0\.blocks\.0\.attn\.qkv\.weight"):
        convert_state_dict(hf)


# ------------------------------------------------------------------------------------------
# load_checkpoint and save_state_dict
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,fmt", [(".pth", "timm"), (".safetensors", "hf"), (".bin", "torchvision"),
                                        (".pt", "official")])
def test_load_checkpoint_files(tmp_path, suffix, fmt):
    src = randomized(tiny(1), seed=5)
    path = tmp_path / f"weights{suffix}"
    save_state_dict(convert_state_dict(src.state_dict(), dst=fmt), path)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not private
    for where in (path, str(path)):
        dst = tiny(1)
        result = load_checkpoint(dst, where)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert_same_state(dst.state_dict(), src.state_dict())


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_load_checkpoint_reads_a_save_pretrained_folder(tmp_path, name):
    """A transformers save_pretrained folder (config.json beside the weights file) loads as its file;
    a folder without one is named as such, not as a missing file."""
    src = randomized(tiny(1), seed=6)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    save_state_dict(convert_state_dict(src.state_dict(), dst="hf"), tmp_path / "hf" / name)
    dst = tiny(1)
    assert load_checkpoint(dst, tmp_path / "hf") == ([], [])
    assert_same_state(dst.state_dict(), src.state_dict())
    with pytest.raises(ValueError, match="is a folder without model.safetensors or pytorch_model.bin"):
        load_checkpoint(tiny(1), tmp_path)


def test_load_checkpoint_training_checkpoint_prefers_model_over_ema(tmp_path):
    src = randomized(tiny(1), seed=6)
    ema = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "ema": ema,
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 7}, path)
    dst = tiny(1)
    load_checkpoint(dst, path)
    assert_same_state(dst.state_dict(), src.state_dict())


def test_saved_buffers_are_ignored():
    src = randomized(tiny(2), seed=7)
    tv = convert_state_dict(src.state_dict(), dst="torchvision", window_size=4)
    assert any(k.endswith("relative_coords_table") for k in tv)
    tv = {k: (v + 1 if k.endswith(("relative_coords_table", "relative_position_index")) else v)
          for k, v in tv.items()}  # garbage buffers change nothing
    dst = tiny(2)
    assert load_checkpoint(dst, tv) == ([], [])
    with torch.no_grad():
        assert torch.equal(dst(X), src(X))


def test_bias_table_is_interpolated_bicubically_to_a_new_window():
    src = randomized(tiny(1, window=7), seed=8)
    same = tiny(1, window=7)
    load_checkpoint(same, src.state_dict())
    assert_same_state(same.state_dict(), src.state_dict())  # window 7 -> 7 is exact

    big = tiny(1, window=12)
    load_checkpoint(big, src.state_dict())
    table7 = src.state_dict()["layers.1.blocks.1.attn.relative_position_bias_table"]  # (169, 2)
    table12 = big.state_dict()["layers.1.blocks.1.attn.relative_position_bias_table"]
    assert table12.shape == (23 * 23, 2)
    expected = F.interpolate(table7.permute(1, 0).reshape(1, 2, 13, 13), size=(23, 23), mode="bicubic",
                             align_corners=False).reshape(2, 23 * 23).permute(1, 0)
    assert torch.allclose(table12, expected, atol=1e-7)
    # the centre (offset 0) of the table keeps its value up to the interpolation
    assert torch.allclose(table12.view(23, 23, 2)[11, 11], table7.view(13, 13, 2)[6, 6], atol=0.05)
    assert torch.equal(big.state_dict()["layers.1.blocks.1.mlp.fc1.weight"],
                       src.state_dict()["layers.1.blocks.1.mlp.fc1.weight"])


def test_v2_weights_load_into_another_window_unchanged():
    src = randomized(tiny(2, window=4), seed=10)
    dst = tiny(2, window=8)  # the CPB MLP has no window-sized parameter
    assert load_checkpoint(dst, src.state_dict()) == ([], [])
    assert_same_state(dst.state_dict(), src.state_dict())


def test_head_of_another_class_count_is_dropped_with_a_warning():
    src = randomized(tiny(1, num_classes=10), seed=9)
    dst = tiny(1, num_classes=5)
    head_before = dst.head.weight.clone()
    with pytest.warns(UserWarning, match="head has 10 classes and the model 5"):
        result = load_checkpoint(dst, convert_state_dict(src.state_dict(), dst="hf"))
    assert result.missing_keys == ["head.weight", "head.bias"] and result.unexpected_keys == []
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.layers[3].blocks[1].attn.qkv.weight, src.layers[3].blocks[1].attn.qkv.weight)
    # a backbone (num_classes=0) takes the rest of a classifier checkpoint
    backbone = tiny(1, num_classes=0)
    with pytest.warns(UserWarning, match="head"):
        assert load_checkpoint(backbone, src.state_dict()) == ([], [])
    with torch.no_grad():
        assert torch.equal(backbone(X), src.forward_features(X))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tiny(1), tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nope.safetensors"))


class _Exploit:
    """Unpickling this creates a file: what a malicious checkpoint could do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny(1).state_dict(), "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="Python objects other than tensors.*refused|safety"):
        load_checkpoint(tiny(1), path)
    with pytest.raises(ValueError, match="safety"):
        read_checkpoint(path)
    assert not marker.exists()


def test_wrong_model_raises_naming_format_and_keys():
    v1 = convert_state_dict(tiny(1).state_dict(), dst="timm")
    with pytest.raises(ValueError, match=r"These are Swin V1 weights and the model is a SwinV2; create a Swin V1"):
        load_checkpoint(tiny(2), v1)
    deeper = tiny(1, depths=(2, 2, 4, 2))
    with pytest.raises(ValueError, match=r"'timm' \(detected; Swin V1\).*missing layers\.2\.blocks\.2\."):
        load_checkpoint(deeper, v1)
    with pytest.raises(ValueError, match=r"'torchvision' \(as given; the keys look like 'timm'.*do not fit"):
        convert_state_dict(v1, src="torchvision")
    with pytest.raises(ValueError, match=r"Swin V1 weights \(format 'timm'\) and the given config is a SwinV2"):
        convert_state_dict(v1, dst="official", config=swin.get_config("swinv2_t_w8"))
    wider = swin.create_model("swin_t", num_classes=10, window_size=4, embed_dim=64, depths=(2, 2, 2, 2),
                              num_heads=(1, 2, 4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same class count: the head is a plain mismatch, not dropped
        with pytest.raises(ValueError, match=r"wrong shape.*head\.weight|wrong shape"):
            load_checkpoint(wider, v1)
    # strict=False reports instead of raising
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load_checkpoint(deeper, v1, strict=False)
    assert "layers.2.blocks.2.attn.qkv.weight" in result.missing_keys and result.unexpected_keys == []


def test_save_state_dict_safetensors_handles_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    sd = {"a": base.t(), "b": base[:3], "c": base[3:]}  # non-contiguous and sharing storage
    path = tmp_path / "out.safetensors"
    save_state_dict(sd, path)
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    for k in sd:
        assert torch.equal(loaded[k], sd[k])
    save_state_dict({"a": torch.ones(2)}, path)  # replaces atomically
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_public_names_are_exposed_lazily():
    assert swin.load_checkpoint is load_checkpoint
    assert swin.convert_state_dict is convert_state_dict
    assert swin.detect_format is detect_format


def test_official_v2_buffers_where_a_map_is_smaller_than_the_window():
    """SwinV2-T window 16 at 256: stage 4's map is 8 x 8, and the official block (like timm's port) runs one
    8 x 8 window there, with a (64, 64) index and a (1, 15, 15, 2) coordinate table normalised by 8 - 1.
    Every written buffer equals timm's."""
    timm = pytest.importorskip("timm")
    config = swin.get_config("swinv2_t_w16")
    off = convert_state_dict(swin.create_model("swinv2_t_w16").state_dict(), dst="official", config=config)
    assert off["layers.3.blocks.0.attn.relative_position_index"].shape == (64, 64)
    ref = dict(timm.create_model("swinv2_tiny_window16_256", pretrained=False).named_buffers())
    checked = 0
    for k, v in off.items():
        if k.endswith(("relative_position_index", "relative_coords_table")):
            assert ref[k].shape[-2:] == v.shape[-2:] or ref[k].numel() == v.numel(), k
            assert torch.allclose(v.float(), ref[k].float().reshape(v.shape), atol=1e-6), k
            checked += 1
    assert checked == 2 * sum(config.depths)


def test_a_shrunk_table_is_resized_for_the_window_the_block_runs():
    """Swin-T window 12 saved at 224 (stage 4's 7 x 7 map: a window-7 table of 169 rows, the rest 529).
    Loaded at 224 the block runs window 7: the table goes in the centre, exactly. Loaded at 384 the
    block runs window 12: the official rule resizes 13 x 13 -> 23 x 23 bicubically (it had been put in
    the centre of zeros: 37% of that block's bias 0). Loaded into window 12 at 192 (a 6 x 6 map, window
    6): resized 13 -> 11, then in the centre."""
    from swin.convert import _embed_bias_table, _resize_bias_table

    torch.manual_seed(0)
    src = swin.create_model("swin_t", window_size=12)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_()
    off = convert_state_dict(src.state_dict(), dst="official", config=src.config)
    key = "layers.3.blocks.0.attn.relative_position_bias_table"
    saved = off[key]
    assert saved.shape[0] == 169 and off["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0] == 529
    for img, runs in ((224, 7), (384, 12), (192, 6)):
        model = swin.create_model("swin_t", window_size=12, img_size=img)
        load_checkpoint(model, off)
        got = model.state_dict()[key]
        want = saved if runs == 7 else _resize_bias_table(saved, runs)
        want = want if runs == 12 else _embed_bias_table(want, 12)
        assert torch.equal(got, want), img
        if runs == 12:
            assert (got == 0).float().mean() < 0.01


def test_a_full_table_is_resized_for_a_block_that_runs_a_smaller_window():
    """A review's repro: Swin-T window 12 saved at 384 (every block runs window 12: full tables) into the
    same window at 192, where stage 4's 6 x 6 map runs window 6. The official model at 192 (and timm) have a
    window-6 table there, which loading resizes 23 x 23 -> 11 x 11; the table went in unchanged (its exact
    centre was read: 3e-3 of the logits' scale off). A swin run's own checkpoint, whose tables are always
    full, says from its recorded config which rows its blocks ran (and trained): a run at 192 fine-tuned at
    384 resizes that trained 11 x 11 centre, not the untouched ring around it; at its own size it loads
    exactly."""
    from dataclasses import asdict

    from swin.convert import _crop_bias_table, _embed_bias_table, _resize_bias_table
    from swin.train import RUN_FORMAT, _plain

    torch.manual_seed(0)
    key = "layers.3.blocks.0.attn.relative_position_bias_table"
    src = randomized(swin.create_model("swin_t", window_size=12, img_size=384))
    full = src.state_dict()[key]
    for fmt in ("official", "timm"):
        model = swin.create_model("swin_t", window_size=12, img_size=192)
        with pytest.warns(UserWarning, match="convert with config="):  # what to do if swin wrote them so
            load_checkpoint(model, convert_state_dict(src.state_dict(), dst=fmt, config=src.config))
        assert torch.equal(model.state_dict()[key], _embed_bias_table(_resize_bias_table(full, 6), 12)), fmt

    run = randomized(swin.create_model("swin_t", window_size=12, img_size=192), seed=1)
    ckpt = {"format": RUN_FORMAT, "model_config": _plain(asdict(run.config)), "model": run.state_dict()}
    model = swin.create_model("swin_t", window_size=12, img_size=384)
    load_checkpoint(model, ckpt)
    trained = _crop_bias_table(run.state_dict()[key], 6)
    assert torch.equal(model.state_dict()[key], _resize_bias_table(trained, 12))
    same = swin.create_model("swin_t", window_size=12, img_size=192)
    load_checkpoint(same, ckpt)
    assert_same_state(same.state_dict(), run.state_dict())
    ckpt["model_config"]["layer_scale"] = 1e-5  # a field of another version: no geometry known, still loads
    load_checkpoint(same, ckpt)
    assert_same_state(same.state_dict(), run.state_dict())


def test_v2_weights_say_which_window_their_coordinates_were_scaled_for(tmp_path):
    """The official code and timm load a window12to16 SwinV2 checkpoint into a plain window-16 model silently
    (~1% of the logits off). Its saved coordinate tables (official, torchvision), a swin run's config or a
    transformers folder's config.json say what the position-bias MLP was trained with: loading warns, naming
    the pretrained_window_sizes that keep it, and is quiet with them."""
    src = tiny(2, window=4, img_size=64, pretrained_window_sizes=(4, 4, 4, 2))
    off = convert_state_dict(src.state_dict(), dst="official", config=src.config)
    for pre, warns in (((0, 0, 0, 0), True), ((4, 4, 4, 2), False)):
        dst = tiny(2, window=8, img_size=64, pretrained_window_sizes=pre)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            load_checkpoint(dst, off)
        said = [str(x.message) for x in w if "pretrained_window_sizes" in str(x.message)]
        assert bool(said) == warns and (not warns or "pretrained_window_sizes=(4, 4, 4, 2)" in said[0]), said
    with warnings.catch_warnings():  # the same window: nothing to say
        warnings.simplefilter("error")
        load_checkpoint(tiny(2, window=4, img_size=64, pretrained_window_sizes=(4, 4, 4, 2)), off)
        # torchvision's layout has full-window tables even where a block ran a smaller one (stage 4 here: a
        # 2 x 2 map): they say nothing about it, and the round trip is exact and quiet
        # a transformers folder's config.json says it too, also for a state dict read from it (swin eval)
        hf = tmp_path / "hf"
        hf.mkdir()
        save_state_dict(convert_state_dict(src.state_dict(), dst="hf"), hf / "model.safetensors")
        (hf / "config.json").write_text(json.dumps({
            "model_type": "swinv2", "image_size": 64, "patch_size": 4, "window_size": 4, "embed_dim": 32,
            "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "pretrained_window_sizes": [4, 4, 4, 2]}))
        load_checkpoint(tiny(2, window=4, img_size=64, pretrained_window_sizes=(4, 4, 4, 2)), hf)
    for args in ((hf,), (read_checkpoint(hf / "model.safetensors"),)):
        with pytest.warns(UserWarning, match=r"pretrained_window_sizes=\(4, 4, 4, 2\)"):
            load_checkpoint(tiny(2, window=8, img_size=64), *args, source=hf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = randomized(tiny(2, window=4, img_size=64), seed=3)
        back = tiny(2, window=4, img_size=64)
        load_checkpoint(back, convert_state_dict(plain.state_dict(), dst="torchvision", config=plain.config))
        assert_same_state(back.state_dict(), plain.state_dict())


# ------------------------------------------------------------------------------------------
# Detection / segmentation backbones: per-stage output norms
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_backbone_output_norms_round_trip_and_norm_the_feature_maps(version):
    """A model with out_norms=True (norm0..norm2 on stages 0-2, the final norm on the last): its
    feature maps are each stage's output through its norm, and its weights round-trip exactly
    through the official detection layout (norm0..norm3), mmdet's (backbone.norm0..3) and, for V1,
    HF's SwinBackbone (hidden_states_norms.stage1..4); a detector's checkpoint (neck, heads around
    backbone.*) loads with those dropped, saying so."""
    src = randomized(tiny(version, num_classes=0, out_norms=True), seed=5)
    sd = src.state_dict()
    assert [k for k in sd if k.startswith("out_norms.")] == [f"out_norms.{i}.{n}" for i in range(3)
                                                             for n in ("weight", "bias")]
    with torch.no_grad():
        maps, raw = src.forward_intermediates(X), src.forward_intermediates(X, norm=False)
        norms = [*src.out_norms, src.norm]
        for m, r, n in zip(maps, raw, norms):
            assert torch.allclose(m, n(r.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)
    fmts = ["official", "mmdet", "swin"] + (["hf"] if version == 1 else [])
    for fmt in fmts:
        out = convert_state_dict(sd, dst=fmt, window_size=4)
        names = {"official": "norm3.weight", "mmdet": "backbone.norm3.weight", "swin": "out_norms.2.weight",
                 "hf": "hidden_states_norms.stage4.weight"}
        assert names[fmt] in out, (fmt, sorted(out)[:5])
        assert_same_state(convert_state_dict(out), sd)
        detector = {(k if k.startswith("backbone.") else "backbone." + k): v for k, v in out.items()}
        detector.update({"neck.fpn_convs.0.conv.weight": torch.zeros(1), "roi_head.bbox_head.fc_cls.weight": torch.zeros(1)})
        dst = tiny(version, num_classes=0, out_norms=True)
        with pytest.warns(UserWarning, match="Dropped 2 key.*detector/segmentor"):
            assert load_checkpoint(dst, {"state_dict": detector}) == ([], [])
        assert_same_state(dst.state_dict(), sd)
    with pytest.warns(UserWarning, match="no place for a backbone's per-stage output norms"):
        assert not any("norm0" in k for k in convert_state_dict(sd, dst="timm"))


def test_classifier_weights_into_a_backbone_and_back():
    """ImageNet classifier weights into an out_norms backbone (how detectors start): the stage norms stay
    as initialised, with a warning, and are reported missing without failing strict loading; a backbone's
    weights into a plain model: its stage norms are dropped, with a warning naming out_norms=True."""
    cls = randomized(tiny(1), seed=6)
    backbone = tiny(1, num_classes=0, out_norms=True)
    fresh = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("out_norms.")}
    with pytest.warns(UserWarning) as record:
        result = load_checkpoint(backbone, cls.state_dict())
    assert any("no output norm for 3 of the model's stages" in str(w.message) for w in record)
    assert sorted(result.missing_keys) == sorted(fresh) and result.unexpected_keys == []
    for k, v in fresh.items():
        assert torch.equal(backbone.state_dict()[k], v)
    plain = tiny(1, num_classes=0)
    with pytest.warns(UserWarning, match="out_norms=True"):
        assert load_checkpoint(plain, randomized(backbone).state_dict()) == ([], [])


def test_detector_checkpoints_of_any_kind_give_their_swin_backbone():
    """Everything around a Swin under backbone. goes, whatever its name (DETR-family queries and encoders,
    an mmcv EMA copy), also under module.; an mmpretrain classifier keeps its head; a SwinBackbone with a
    stem output drops that norm; a classifier with out_norms keeps `norm` in the official layout; the 4.x
    SwinBackbone layout has no swin. prefix and no final layernorm."""
    src = randomized(tiny(1, num_classes=0, out_norms=True), seed=7)
    sd = src.state_dict()
    around = {"neck.lateral_convs.0.conv.weight": torch.zeros(2), "level_embed": torch.zeros(5, 8),
              "query_embedding.weight": torch.zeros(9, 8), "encoder.layers.0.self_attn.value_proj.weight": torch.zeros(8, 8),
              "dn_query_generator.label_embedding.weight": torch.zeros(3), "ema_backbone_layers_0_blocks_0_norm1_weight": torch.zeros(2)}
    for fmt in ("official", "mmdet"):
        out = convert_state_dict(sd, dst=fmt)
        det = {**{(k if k.startswith("backbone.") else "backbone." + k): v for k, v in out.items()}, **around}
        for ckpt in (det, {"module." + k: v for k, v in det.items()}):
            dst = tiny(1, num_classes=0, out_norms=True)
            with pytest.warns(UserWarning, match=f"Dropped {len(around)} key"):
                assert load_checkpoint(dst, {"state_dict": ckpt}) == ([], [])
            assert_same_state(dst.state_dict(), sd)
    classifier = randomized(tiny(1, num_classes=10, out_norms=True), seed=8).state_dict()
    official = convert_state_dict(classifier, dst="official")
    assert {"norm.weight", "norm0.weight", "head.weight"} <= set(official) and "norm3.weight" not in official
    assert_same_state(convert_state_dict(official), classifier)
    mm = {("backbone." + k[len("backbone."):] if k.startswith("backbone.") else k): v
          for k, v in convert_state_dict(classifier, dst="mmdet").items()}
    assert "head.fc.weight" in mm
    assert_same_state(convert_state_dict(mm), classifier)  # mmpretrain: backbone. and head. both kept
    hf4 = convert_state_dict(sd, dst="hf", hf_version=4)
    assert "hidden_states_norms.stage4.weight" in hf4 and not any(k.startswith(("swin.", "layernorm")) for k in hf4)
    assert_same_state(convert_state_dict(hf4), sd)
    with pytest.warns(UserWarning, match="no place for a classifier's per-stage output norms"):
        convert_state_dict(classifier, dst="hf")


def test_hf_swin_backbone_with_a_stem_output_loads():
    transformers = pytest.importorskip("transformers")
    hf = transformers.SwinBackbone(transformers.SwinConfig(
        embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4, image_size=64,
        out_features=["stem", "stage1", "stage2", "stage3", "stage4"]))
    model = tiny(1, num_classes=0, out_norms=True)
    with pytest.warns(UserWarning, match="stem norm"):
        assert load_checkpoint(model, hf.state_dict()) == ([], [])


def test_config_flags_take_numpy_bools_and_0_1():
    import numpy as np

    for value, want in ((np.False_, False), (0, False), (1, True), (np.True_, True)):
        config = swin.create_model("swin_micro", qkv_bias=value, mask_padding=value).config
        assert config.qkv_bias is want and config.mask_padding is want
    with pytest.raises(ValueError, match="out_norms must be True or False, got 'yes'"):
        swin.create_model("swin_micro", out_norms="yes")
