"""The model on its own: registry, exact params/FLOPs, shapes at any size, backbone contract,
statelessness, compile, grad checkpointing, and clear errors for bad input."""
import math

import pytest
import torch

import swin
from swin import windows as W

# (name, size, params, FLOPs): the official figures, REFERENCE.md
OFFICIAL = [
    ("swin_t", 224, 28_288_354, 4_494_405_120),
    ("swin_s", 224, 49_606_258, 8_746_520_064),
    ("swin_b", 224, 87_768_224, 15_438_473_216),
    ("swin_b_384", 384, 87_903_584, 47_105_253_376),
    ("swin_l", 224, 196_532_476, 34_487_049_216),
    ("swin_l_384", 384, 196_735_516, 103_952_265_216),
    ("swinv2_t_w8", 256, 28_347_154, 5_925_697_536),
    ("swinv2_t_w16", 256, 28_347_154, 6_605_174_784),
    ("swinv2_s_w8", 256, 49_728_418, 11_514_869_760),
    ("swinv2_b_w8", 256, 87_918_816, 20_285_661_184),
]

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, num_classes=7)


def tiny(version: int = 1, **kw) -> swin.SwinTransformer:
    name = "swin_t" if version == 1 else "swinv2_t_w8"
    torch.manual_seed(0)
    return swin.create_model(name, **{**TINY, **kw})


@pytest.mark.parametrize("name,size,params,macs", OFFICIAL, ids=[f"{r[0]}@{r[1]}" for r in OFFICIAL])
def test_params_and_flops_equal_official(name, size, params, macs):
    with torch.device("meta"):
        model = swin.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert swin.flops(model, img_size=(size, size)) == macs
    assert swin.flops(model) == macs  # the variant's nominal size is the default


def test_flops_any_size_grows_with_area():
    model = tiny()
    f = [swin.flops(model, (s, s)) for s in (64, 128, 256)]
    assert f[0] < f[1] < f[2]
    assert swin.flops(model, (100, 300)) > 0 and swin.flops(model, (231, 177)) > 0
    with pytest.raises(ValueError, match="patch size"):
        swin.flops(model, (2, 64))


def test_registry_and_unknown_name():
    names = swin.list_models()
    for required in ("swin_t", "swin_s", "swin_b", "swin_l", "swin_b_384", "swin_l_384", "swinv2_t_w8",
                     "swinv2_t_w16", "swinv2_s_w8", "swinv2_s_w16", "swinv2_b_w8", "swinv2_b_w16",
                     "swinv2_b_w24_384", "swinv2_l_w24_384"):
        assert required in names
    with pytest.raises(ValueError, match="swin_t"):
        swin.create_model("swin_tt")
    with pytest.raises(ValueError, match="Unknown config field"):
        swin.create_model("swin_t", not_a_field=3)
    m = swin.create_model("swinv2_b_w24_384", num_classes=5)
    assert m.config.pretrained_window_sizes == (12, 12, 12, 6) and m.config.window_size == 24


def test_no_buffers_in_state_dict():
    model = tiny(version=2)
    assert all("index" not in k and "mask" not in k and "coords" not in k for k in model.state_dict())
    assert len(list(model.buffers())) == 0


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [(64, 64), (100, 300), (231, 177), (33, 65), (4, 4), (5, 130)])
def test_any_size_forward_and_intermediates(version, size):
    model = tiny(version).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x)
        pooled = model.forward_features(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert pooled.shape == (2, model.num_features)
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for i, f in enumerate(feats):
        assert f.shape == (2, 16 * 2**i, h, w), (i, f.shape)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    # the last map, normalised and pooled, is exactly what the head sees
    with torch.no_grad():  # the same (no-grad) attention path as `pooled`
        last = model.forward_intermediates(x, indices=(3,), norm=True)[0]
    torch.testing.assert_close(last.mean(dim=(2, 3)), pooled, rtol=0, atol=1e-6)


def test_intermediates_index_selection_and_strides():
    model = tiny().eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        sel = model.forward_intermediates(x, indices=(1, -1))
        full = model.forward_intermediates(x)
    assert [f.shape[-1] for f in sel] == [96 // 8, 96 // 32]
    torch.testing.assert_close(sel[0], full[1], rtol=0, atol=0)
    torch.testing.assert_close(sel[1], full[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=(4,))
    assert model.forward_intermediates(x, indices=[]) == []
    with torch.no_grad():  # one int: that stage
        torch.testing.assert_close(model.forward_intermediates(x, indices=2)[0], full[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="indices must be stage numbers"):
        model.forward_intermediates(x, indices=[0.5])
    info = model.feature_info  # what an FPN neck needs: each map's channels and stride
    assert [i["num_chs"] for i in info] == [f.shape[1] for f in full]
    assert [128 // i["reduction"] for i in info] == [f.shape[2] for f in full]


def test_forward_is_stateless_across_sizes():
    """HF mutates its window size in forward; a small input must not change a later large one."""
    model = tiny().eval()
    big, small = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 20, 36)
    with torch.no_grad():
        a = model(big)
        model(small)
        b = model(big)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_pure_fp16_v2_on_a_padded_map_is_finite(backend):
    """model.half(): V2 has no k bias, so a padded token's k is 0; F.normalize's eps (1e-12) is 0 in
    fp16, and the reference path once made 0/0 = NaN of every window holding padding."""
    torch.manual_seed(0)
    model = swin.create_model("swinv2_micro", backend=backend).eval()
    x = torch.randn(2, 3, 36, 28)  # maps not a multiple of the window at every stage
    with torch.no_grad():
        ref = model(x)
        out = model.half()(x.half()).float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_batch_independence_and_eval_determinism():
    model = tiny(version=2, drop_path_rate=0.3, drop_rate=0.2, attn_drop_rate=0.2).eval()
    x = torch.randn(4, 3, 72, 40)
    with torch.no_grad():
        full = model(x)
        again = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.equal(full, again)
    torch.testing.assert_close(full, single, rtol=0, atol=1e-5)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        t1 = model(x)
        torch.manual_seed(2)
        t2 = model(x)
    assert (t1 - t2).abs().max() > 1e-4  # dropout and drop path are active in training


@pytest.mark.parametrize("version", [1, 2])
def test_grad_checkpointing_parity(version):
    model = tiny(version, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 48)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in ref.values()), "every parameter must receive a gradient"
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("version", [1, 2])
def test_torch_compile_fullgraph_two_sizes(version):
    model = tiny(version).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for size in ((64, 64), (36, 52)):
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_torch_export_with_a_dynamic_batch(version):
    """Deployment: torch.export of the default backend, batch size left dynamic (the spatial size is
    fixed: padding depends on it), runs other batch sizes and equals eager."""
    model = tiny(version).eval()
    x = torch.randn(2, 3, 36, 52)  # padded maps in every stage
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    with torch.no_grad():
        for batch in (2, 5, 1):
            xb = torch.randn(batch, 3, 36, 52)
            torch.testing.assert_close(program.module()(xb), model(xb), rtol=1e-4, atol=1e-5)
        expected = model(x)
    # exported with autograd on, the program also runs with it on (V2 once recorded an out= division)
    torch.testing.assert_close(program.module()(x).detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_torch_jit_trace_of_a_fresh_model_takes_any_batch(version):
    """torch.jit.trace passes its own check on a model never called before (the first call's caches
    made the two recordings differ), and the trace runs other batch sizes (the per-image attention
    loop had fixed the batch)."""
    model = tiny(version).eval()
    x = torch.randn(2, 3, 36, 52)  # padded maps
    with torch.no_grad():
        traced = torch.jit.trace(model, x)  # check_trace on
        for batch in (2, 3, 1):
            xb = torch.randn(batch, 3, 36, 52)
            torch.testing.assert_close(traced(xb), model(xb), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_torch_jit_trace_with_autograd_on_saves_and_reloads(version, tmp_path):
    """Traced as most do (autograd on), the check passes (the recording took Python autograd Functions
    where the check's no-grad one took plain operators), and the trace saves and reloads (it could not
    serialise the softmax's Function)."""
    model = tiny(version).eval()
    x = torch.randn(2, 3, 36, 52)
    traced = torch.jit.trace(model, x)
    torch.jit.save(traced, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        xb = torch.randn(3, 3, 36, 52)
        torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 64, 64), "4-D"),
    (torch.randn(1, 1, 64, 64), "3 input channels"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating-point"),
    (torch.randn(1, 3, 3, 64), "at least the patch size"),
    (torch.randn(1, 3, 64, 2), "at least the patch size"),
])
def test_bad_input_raises_one_clear_sentence(bad, match):
    model = tiny().eval()
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_input_of_another_dtype_than_the_weights_is_one_sentence():
    model = tiny().eval()
    with pytest.raises(ValueError, match="input is torch.float64 and the model's weights are torch.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast takes care of it
        assert model(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16


@pytest.mark.parametrize("field,value,match", [
    ("window_size", 2.5, "window_size must be a positive integer"), ("embed_dim", 0, "embed_dim must be"),
    ("num_heads", (0, 2, 2, 4), "num_heads must be positive"), ("depths", (), "depths must be"),
    ("drop_path_rate", 1.5, r"drop_path_rate must be in \[0, 1\)"), ("mlp_ratio", 0, "mlp_ratio must be positive"),
    ("in_chans", 0, "in_chans must be"), ("num_classes", -1, "num_classes must be"),
    ("img_size", (32,), "img_size must be"), ("pretrained_window_sizes", (-1, 0, 0, 0), "pretrained_window_sizes"),
])
def test_bad_config_raises_one_clear_sentence(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


@pytest.mark.parametrize("version", [1, 2])
def test_fast_paths_honour_each_dropout_modules_own_mode(version):
    """Monte-Carlo dropout: the model in eval, its dropout / drop-path modules alone back in training
    mode. Every path then draws (outputs vary) as the reference does; with them in eval, none does."""
    model = tiny(version, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    kinds = (torch.nn.Dropout, swin.model.DropPath)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(model(x), model(x))
            for name in ("attn_drop", "proj_drop", "drop1", "drop_path"):
                for n, m in model.named_modules():
                    m.train(isinstance(m, kinds) and n.endswith(name))
                assert not torch.equal(model(x), model(x)), (grad, name)
                model.eval()


def test_weight_caches_follow_a_dtype_round_trip_and_assign_loads():
    """model.bfloat16(); model.float() (or load_state_dict(assign=True)) makes new weight tensors, which
    may land at a freed one's address at version 0; the fast paths' caches must not take them for
    the old ones (they did: V2 logits 5e-3 of their scale off the reference)."""
    import copy

    for version in (1, 2):
        for seed in range(4):
            model = tiny(version).eval()
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            model.double().float()
            with torch.no_grad():
                model(x)  # caches built
                model.bfloat16().float()  # every weight rounded, new tensors
                out = model(x)
                ref = copy.deepcopy(model)
                ref.set_backend("reference")
                assert (out - ref(x)).abs().max() <= 1e-5 * ref(x).abs().max(), (version, seed)
                new = {k: v.clone() * 1.01 for k, v in model.state_dict().items()}
                model.load_state_dict(new, assign=True)
                ref.load_state_dict(new)
                assert (model(x) - ref(x)).abs().max() <= 1e-5 * ref(x).abs().max(), (version, seed)


def test_functional_call_vmap_ensembles_and_inference_mode_models_are_exact():
    """torch.func.functional_call hands in new tensors on every call; one may sit at the last call's freed
    address at version 0, and the caches took it for the old one (logits up to 0.85 of their scale off).
    vmap ensembles and models built under inference_mode crashed; a float64 V2 was fp32-accurate only."""
    from torch.func import functional_call, stack_module_state, vmap

    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for version in (1, 2):
        model, ref = tiny(version).eval(), tiny(version).eval()
        ref.set_backend("reference")
        base = {k: t.detach().clone() for k, t in model.named_parameters()}
        with torch.no_grad():
            for scale in (1.0, 0.8, 1.2, 0.6):  # new tensors each call, freed when the call returns
                a = functional_call(model, {k: t * scale for k, t in base.items()}, (x,))
                b = functional_call(ref, {k: t * scale for k, t in base.items()}, (x,))
                assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (version, scale)  # stale caches: 4e-2
        members = [tiny(version).eval() for _ in range(3)]
        params, buffers = stack_module_state(members)
        with torch.no_grad():
            out = vmap(lambda p, b: functional_call(members[0], (p, b), (x,)))(params, buffers)
            for i, m in enumerate(members):
                assert (out[i] - m(x)).abs().max() <= 1e-5 * out[i].abs().max(), (version, i)
        with torch.inference_mode():
            built = tiny(version).eval()
            built.load_state_dict(model.state_dict())
            assert (built(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
        wide, ref64 = tiny(version).double().eval(), tiny(version).double().eval()
        ref64.load_state_dict(wide.state_dict())
        ref64.set_backend("reference")
        with torch.no_grad():
            a, b = wide(x.double()), ref64(x.double())
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), version  # fp64 throughout (V2 was 5e-8)


def test_reference_backend_is_plain_pytorch_in_patch_merging_too():
    from swin.ops import cpu_tiled

    model = tiny().eval()
    merging = model.layers[0].downsample
    x = torch.randn(1, 16, 16, merging.reduction.in_features // 4)
    with torch.no_grad():
        assert cpu_tiled.merge_eligible(merging, x) == cpu_tiled.cpu_kernels.available()
        model.set_backend("reference")
        assert not cpu_tiled.merge_eligible(merging, x)


def test_empty_batch_quantized_v2_and_biasless_linears_run():
    """Three things users do that crashed a fast path: an empty batch with autograd on, SwinV2 under
    torch.ao dynamic quantization, a block Linear without bias."""
    for version in (1, 2):
        model = tiny(version)
        assert model.train()(torch.randn(0, 3, 64, 64)).shape == (0, 7)
        assert model.eval()(torch.randn(0, 3, 64, 64)).shape == (0, 7)
    q = torch.ao.quantization.quantize_dynamic(tiny(2).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(1, 3, 64, 64))).all()
    import copy

    model = tiny().eval()
    model.layers[0].blocks[0].mlp.fc1.bias = None
    model.layers[0].blocks[1].attn.proj.bias = None
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_shift_mask_matches_official_construction():
    """The official mask: 3x3 regions by slices of the (padded) shifted map, -100 between regions."""
    H = Wd = 14
    M, s = 7, 3
    img = torch.zeros(1, H, Wd, 1)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = W.window_partition(img, M).view(-1, M * M)
    official = mw.unsqueeze(1) - mw.unsqueeze(2)
    official = official.masked_fill(official != 0, -100.0).masked_fill(official == 0, 0.0)
    ours = W.shift_mask(H, Wd, M, s, False, torch.device("cpu"))
    assert torch.equal(ours, official)
    assert W.shift_mask(H, Wd, M, 0, False, torch.device("cpu")) is None
    assert W.shift_mask(13, 12, M, s, False, torch.device("cpu")).shape == (4, 49, 49)  # built on the padded 14x14


def test_window_rule_is_official():
    assert W.window_and_shift(56, 56, 7, 3) == (7, 3)
    assert W.window_and_shift(7, 7, 7, 3) == (7, 0)
    assert W.window_and_shift(4, 10, 7, 3) == (4, 0)
    assert W.window_and_shift(8, 9, 7, 3) == (7, 3)


@pytest.mark.parametrize("shift", [0, 2])
def test_mask_padding_attends_only_to_real_tokens(shift):
    """With mask_padding the padded zeros get no attention: compare with explicit per-window attention."""
    torch.manual_seed(0)
    attn = swin.model.WindowAttention(8, 2, 4, version=1, qkv_bias=True, pretrained_window=0,
                                      attn_drop=0.0, proj_drop=0.0)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    H, Wd, M = 6, 7, 4
    x = torch.randn(1, H, Wd, 8)
    out = attn(x, M, shift, mask_padding=True)
    # reference: pad, roll, and for each window attend over the keys that are real and share a region
    xp = W.pad_to_window(x, M)
    real = torch.zeros(1, 8, 8, 1)
    real[:, :H, :Wd] = 1
    region = torch.zeros(1, 8, 8, 1)
    if shift:
        xp, real = (torch.roll(t, (-shift, -shift), (1, 2)) for t in (xp, real))
        cnt = 0
        for hs in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
            for ws in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
                region[:, hs, ws] = cnt
                cnt += 1
    win, rw, gw = (W.window_partition(t, M) for t in (xp, real, region))  # (nW, 16, C)
    bias = attn.position_bias(M)
    res = []
    for w_, r_, g_ in zip(win, rw[..., 0], gw[..., 0]):
        qkv = attn.qkv(w_).view(16, 3, 2, 4).permute(1, 2, 0, 3)
        q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
        logits = q @ k.transpose(-1, -2) + bias
        allowed = (r_[None, :] > 0) & (g_[None, :] == g_[:, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
        res.append(attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(16, 8)))
    ref = W.window_reverse(torch.stack(res), M, 8, 8)
    if shift:
        ref = torch.roll(ref, (shift, shift), (1, 2))
    ref = ref[:, :H, :Wd]
    # -100 instead of -inf leaves ~e^-100 of weight: far below fp32 resolution
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # without mask_padding the padded zeros do take part (what the official/torchvision/HF code computes)
    assert not torch.allclose(attn(x, M, shift, mask_padding=False), ref, atol=1e-4)


def test_drop_path_scales_kept_samples():
    dp = swin.model.DropPath(0.5).train()
    x = torch.ones(2000, 3)
    y = dp(x)
    kept = y[:, 0] > 0
    assert torch.all(y[kept] == 2.0)
    assert 0.4 < kept.float().mean() < 0.6
    assert torch.equal(dp.eval()(x), x)


@pytest.mark.parametrize("p,seed", [(0.5, 0), (0.5, 3), (0.999, 0), (1e-6, 0)],
                         ids=["some-dropped", "some-dropped-2", "all-dropped", "none-dropped"])
def test_drop_path_residual_skips_dropped_samples(p, seed):
    """residual(x, f) = x + DropPath(f(x)) with the same mask: values and gradients, f run on kept rows only."""
    torch.manual_seed(1)
    f = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
    x = torch.randn(8, 5, 6, requires_grad=True)
    dp = swin.model.DropPath(p).train()
    rows = []
    f[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))

    def run(fn):
        torch.manual_seed(seed)
        out = fn()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    (x, *f.parameters()))
        return out, grads

    out, grads = run(lambda: dp.residual(x, f))
    kept = rows[-1]
    rows.clear()
    torch.manual_seed(seed)
    mask = torch.empty(8).bernoulli_(1 - p)  # the draw residual() makes first
    ref, ref_grads = run(lambda: x + dp(f(x)))  # the reference draws the same mask after f
    n_kept = int(mask.sum())
    assert kept == (8 if n_kept in (0, 8) else n_kept)  # the branch saw only the kept samples
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)  # all dropped: zeros, not None


def test_drop_path_residual_under_autocast():
    """A bf16 branch (CPU autocast) added to an fp32 stream: the dtype x + DropPath(f(x)) would have."""
    torch.manual_seed(0)
    f = torch.nn.Linear(6, 6)
    x = torch.randn(8, 6, requires_grad=True)
    dp = swin.model.DropPath(0.5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(2)
        out = dp.residual(x, f)
        torch.manual_seed(2)
        mask = torch.empty(8).bernoulli_(0.5)
        torch.manual_seed(2)
        ref = x + dp(f(x))
    assert 0 < mask.sum() < 8 and out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert x.grad is not None and f.weight.grad is not None


def test_drop_path_training_step_equals_mask_product(monkeypatch):
    """A whole model's loss and parameter gradients with dropped samples skipped equal the plain
    mask product's (same seed, so the same masks)."""
    model = tiny(drop_path_rate=0.5, img_size=(32, 32)).train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 7, (6,))
    seen = []  # batch sizes that the attention branches ran on
    for m in model.modules():
        if isinstance(m, swin.model.WindowAttention):
            m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))

    def grads():
        torch.manual_seed(5)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, list(model.parameters()))
        return loss, g

    loss, g = grads()
    assert min(seen) < 6  # some branches skipped samples
    seen.clear()
    monkeypatch.setattr(swin.model.DropPath, "SKIP_DEVICES", ())
    ref_loss, ref_g = grads()
    assert set(seen) == {6}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_order_gradients_are_right_or_refused():
    """create_graph=True through the fast backend's Functions (oneDNN products, the MLP recompute, the
    attention and V2 normalisation kernels) had given wrong second derivatives silently (0.7-1.4 of
    their size off: the residual path carried on without the Functions' share); now they raise. The
    reference backend gives them, equal to a finite difference."""
    import copy

    torch.manual_seed(0)
    fast = swin.create_model("swin_micro", depths=(1, 1), num_heads=(2, 4), drop_path_rate=0.0).eval()
    ref = copy.deepcopy(fast).double()
    ref.set_backend("reference")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    v = torch.randn_like(x)

    def second(model, x):
        x = x.clone().requires_grad_()
        gx, = torch.autograd.grad((model(x) ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), x)[0]

    def first(x):  # d/dx of (gx ** 2).sum(), by central differences along v
        xs = [(x + s * 1e-5 * v).requires_grad_() for s in (1, -1)]
        vals = [(torch.autograd.grad((ref(t) ** 2).sum(), t)[0] ** 2).sum() for t in xs]
        return (vals[0] - vals[1]) / 2e-5

    g = second(ref, x)
    assert torch.isclose((g * v).sum(), first(x), rtol=1e-4)
    with pytest.raises(RuntimeError, match=r"Second derivatives .*set_backend\('reference'\)"):
        second(fast, x.float())
    x1 = torch.randn(1, 3, 16, 16, requires_grad=True)  # first derivatives with create_graph=False: unchanged
    gx, = torch.autograd.grad(fast(x1).sum(), x1)
    gr, = torch.autograd.grad(ref.float()(x1).sum(), x1)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-6)
