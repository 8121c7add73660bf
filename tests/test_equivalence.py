"""Same logits (and gradients) as timm, torchvision and HF transformers, through the converter.

Every comparison runs in both directions: our random weights -> their layout -> their model
(loaded strict=True), and their random weights -> our layout -> our model (strict=True).
Weights are perturbed away from the init so that no LayerNorm is the identity, no bias is zero
and the V2 logit scales differ per head.

Where the peers' rules for odd sizes differ from ours (the official rule: a map not larger than
the window is one unshifted window of its size; otherwise pad right/bottom to a window multiple
*before* the cyclic shift and build the mask on the padded map), the cases below avoid them.
Measured with timm 1.0, torchvision 0.29, transformers 5.24:

- timm rolls before padding, so it agrees only where every stage map is a window multiple (or, by
  coincidence, where the padding equals the shift): e.g. tiny window 4 at 100x300 differs by 2e-2.
  Its window also shrinks per axis (a non-square table) when one side of a map is below the window.
- torchvision keeps the window when a map is smaller (padding it) and zeroes the shift only on the
  axis whose padded size is <= window: a 4x10 map with window 4 is still shifted along W, which is
  why the 100x300 case uses depths (2, 2, 2, 1) (the last stage has no shifted block). Its stem
  conv crops instead of padding, so sizes not divisible by 4 (231x177) differ.
- HF V1 (5.x) keeps a bias table for the configured window and crashes when a map is smaller than
  the window (231x177 with window 7: the last map is 8x6).
- HF V2 fixes each stage's window at construction from floor(image_size / 4 / 2**i): at 100x300 the
  last map is 4x10 but HF computes 3x9 and uses window 3 (differs by 0.14); at 231x177 it agrees.
"""
from __future__ import annotations

import pytest
import torch

import swin
from swin.convert import convert_state_dict

timm_v1 = pytest.importorskip("timm.models.swin_transformer")
timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
TINY_LAST1 = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8))
T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
NUM_CLASSES = 10


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter (LayerNorms, biases, logit scales included); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if (p.ndim <= 1 or "logit_scale" in name) else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def ours(version: int, arch: dict, window: int) -> swin.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t_w8"
    return swin.create_model(name, num_classes=NUM_CLASSES, window_size=window, drop_path_rate=0.0, **arch)


def peer(kind: str, version: int, arch: dict, window: int, size: tuple[int, int]) -> torch.nn.Module:
    E, D, H = arch["embed_dim"], tuple(arch["depths"]), tuple(arch["num_heads"])
    if kind == "timm":
        cls = timm_v1.SwinTransformer if version == 1 else timm_v2.SwinTransformerV2
        return cls(img_size=size, embed_dim=E, depths=D, num_heads=H, window_size=window, num_classes=NUM_CLASSES,
                   drop_path_rate=0.0)
    if kind == "torchvision":
        kw = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if version == 2 else {}
        return tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=E, depths=list(D), num_heads=list(H),
                                       window_size=[window, window], num_classes=NUM_CLASSES,
                                       stochastic_depth_prob=0.0, **kw)
    # A fresh HF model per input size: HF V1 overwrites its window size during forward and V2 fixes it
    # from image_size.
    cfg_cls, model_cls = ((transformers.SwinConfig, transformers.SwinForImageClassification) if version == 1 else
                          (transformers.Swinv2Config, transformers.Swinv2ForImageClassification))
    cfg = cfg_cls(image_size=list(size), patch_size=4, embed_dim=E, depths=list(D), num_heads=list(H),
                  window_size=window, num_labels=NUM_CLASSES, drop_path_rate=0.0, hidden_act="gelu",
                  layer_norm_eps=1e-5)
    return model_cls(cfg)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return (a - b).abs().max().item(), 1e-4 * max(1.0, a.abs().max().item())


def test_layer_norm_eps_is_the_same_everywhere():
    ln = [m for m in ours(1, TINY, 4).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert {m.eps for m in ln} == {1e-5}
    for kind in ("timm", "torchvision", "hf"):
        for version in (1, 2):
            p = peer(kind, version, TINY, 4, (224, 224))
            assert {m.eps for m in p.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}, (kind, version)
    assert transformers.SwinConfig().layer_norm_eps == 1e-5 and transformers.Swinv2Config().layer_norm_eps == 1e-5


# (peer, version, arch, window, size): sizes where the peer's rule agrees with ours (module docstring).
CASES = [
    ("timm", 1, TINY, 7, (224, 224)),
    ("timm", 2, TINY, 7, (224, 224)),
    ("timm", 1, TINY_LAST1, 4, (128, 256)),  # maps 32x64 .. 4x8, all window multiples
    ("timm", 2, TINY_LAST1, 4, (128, 256)),
    ("torchvision", 1, TINY, 4, (224, 224)),  # 14x14 and 7x7 maps padded to 16 and 8
    ("torchvision", 2, TINY, 4, (224, 224)),
    ("torchvision", 1, TINY_LAST1, 4, (100, 300)),  # maps 25x75, 13x38, 7x19, 4x10
    ("torchvision", 2, TINY_LAST1, 4, (100, 300)),
    ("hf", 1, TINY, 4, (224, 224)),
    ("hf", 2, TINY, 4, (224, 224)),
    ("hf", 1, TINY, 4, (100, 300)),  # HF V1 also shifts nothing on the 4x10 map, like us
    ("hf", 1, TINY_LAST1, 4, (231, 177)),  # maps 58x45, 29x23, 15x12, 8x6
    ("hf", 2, TINY_LAST1, 4, (231, 177)),
]


def _case_id(case):
    kind, version, arch, window, size = case
    return f"{kind}-v{version}-d{''.join(map(str, arch['depths']))}-w{window}-{size[0]}x{size[1]}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_same_logits_both_directions(case):
    kind, version, arch, window, size = case
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))

    # ours -> theirs
    a = perturb(ours(version, arch, window), seed=2)
    b = peer(kind, version, arch, window, size).eval()
    b.load_state_dict(convert_state_dict(a.state_dict(), dst=kind, window_size=window), strict=True)
    with torch.no_grad():
        diff, tol = max_diff(logits(a, x), logits(b, x))
    assert diff <= tol, f"ours -> {kind}: max abs diff {diff:.3g} > {tol:.3g}"

    # theirs -> ours
    b = perturb(peer(kind, version, arch, window, size), seed=3)
    a = ours(version, arch, window).eval()
    a.load_state_dict(convert_state_dict(b.state_dict(), src=kind), strict=True)
    with torch.no_grad():
        diff, tol = max_diff(logits(b, x), logits(a, x))
    assert diff <= tol, f"{kind} -> ours: max abs diff {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("kind", ["timm", "torchvision", "hf"])
def test_full_size_swin_t_224(kind):
    """Full Swin-T, the peer's random weights converted to ours (the direction real checkpoints take)."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    b = perturb(peer(kind, 1, T, 7, (224, 224)), seed=5)
    a = ours(1, T, 7).eval()
    a.load_state_dict(convert_state_dict(b.state_dict()), strict=True)
    with torch.no_grad():
        diff, tol = max_diff(logits(b, x), logits(a, x))
    assert diff <= tol, f"{kind} -> ours, swin_t 224: max abs diff {diff:.3g} > {tol:.3g}"


def test_timm_v1_with_a_shrunk_last_window_loads_exactly():
    """timm (and the official code) built at 96 px with window 6 run the last stage's 3 x 3 map as one
    3 x 3 window and save a 5 x 5 bias table there (11 x 11 in the other stages). Into our model at 96 px
    load_checkpoint puts it in the centre of our 11 x 11 table, the rows a 3 x 3 window reads; resizing it
    bicubically moved the logits by 8e-4 of their scale here. A model left at 224 px runs that block at
    window 6: the table is resized for it (the official fine-tuning rule), with a warning that names
    img_size."""
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    b = perturb(peer("timm", 1, TINY, 6, (96, 96)), seed=3)
    assert b.state_dict()["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (25, 8)
    with pytest.warns(UserWarning, match="create it with that img_size"):
        swin.load_checkpoint(ours(1, TINY, 6), b.state_dict())
    a = swin.create_model("swin_t", num_classes=NUM_CLASSES, window_size=6, drop_path_rate=0.0, img_size=(96, 96),
                          **TINY)
    assert swin.load_checkpoint(a.eval(), b.state_dict()) == ([], [])
    with torch.no_grad():
        diff, tol = max_diff(logits(b, x), logits(a, x))
    assert diff <= tol, f"timm -> ours: max abs diff {diff:.3g} > {tol:.3g}"
    # and back, told the image size: the last stage's table cut to the centre again, exactly timm's
    back = convert_state_dict(a.state_dict(), dst="timm", config=swin.get_config(
        "swin_t", window_size=6, img_size=96, **TINY))
    c = peer("timm", 1, TINY, 6, (96, 96)).eval()
    c.load_state_dict(back, strict=True)
    assert all(torch.equal(back[k], v) for k, v in b.state_dict().items() if k in back)


@pytest.mark.parametrize("version", [1, 2])
def test_gradients_match_timm(version):
    """d(loss)/d(param) for every parameter equals timm's, mapped through the converter."""
    size, window = (128, 256), 4
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
    w = torch.randn(2, NUM_CLASSES, generator=torch.Generator().manual_seed(7))
    b = perturb(peer("timm", version, TINY_LAST1, window, size), seed=8)
    a = ours(version, TINY_LAST1, window).eval()
    a.load_state_dict(convert_state_dict(b.state_dict(), src="timm"), strict=True)
    (logits(a, x) * w).sum().backward()
    (logits(b, x) * w).sum().backward()
    theirs = convert_state_dict({n: p.grad for n, p in b.named_parameters()}, src="timm")
    grads = dict(a.named_parameters())
    assert theirs.keys() == grads.keys()
    worst = 0.0
    for name, p in grads.items():
        ref = theirs[name]
        rel = (p.grad - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        worst = max(worst, rel)
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.3g}"
    assert worst <= 1e-4


def test_backbone_feature_maps_equal_hf_swin_backbone():
    """A detection backbone (out_norms=True) against transformers' SwinBackbone with all four stages out,
    weights converted both ways (strict): the normed feature maps agree. At 320 x 288 every stage map is
    larger than the window; SwinBackbone (and the official detection code) also shift a map that is not,
    where ours follows the classifier's rule (one unshifted window of the map's size)."""
    from transformers import SwinBackbone, SwinConfig as HFConfig

    model = perturb(swin.create_model("swin_t", num_classes=0, out_norms=True, **T), 0).eval()
    hf = SwinBackbone(HFConfig(image_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                               window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
    hf.load_state_dict(convert_state_dict(model.state_dict(), dst="hf"), strict=True)
    x = torch.randn(2, 3, 320, 288, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_maps, theirs = model.forward_intermediates(x), hf(x).feature_maps
        back = swin.create_model("swin_t", num_classes=0, out_norms=True, **T).eval()
        swin.load_checkpoint(back, perturb(hf, 1).state_dict())
        again, theirs2 = back.forward_intermediates(x), hf(x).feature_maps
    for a, b in [*zip(ours_maps, theirs), *zip(again, theirs2)]:
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * b.abs().max()
