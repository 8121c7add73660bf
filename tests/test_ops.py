"""Every fast window-attention path against the reference path (the spec), forward and backward.

CPU: the SDPA backend here; the Triton kernels under TRITON_INTERPRET=1 in a subprocess (the
interpreter must be switched on before Triton is imported). CUDA (when present): SDPA and Triton
on the GPU, fp32 and bf16.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import swin
from swin import windows as W
from swin.model import WindowAttention
from swin.ops import check_backend, resolve_backend, triton_available

# what these tests assert of compiled graphs holds from torch 2.11 (the oldest the GPU runs used); on
# older ones (pyproject allows 2.6) compiled CPU inference takes the per-block path: right, not as fast
TORCH_2_11 = torch.__version__ >= (2, 11)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _first_launch_configuration(monkeypatch):
    """The Triton kernels run their first launch configuration here, untimed (on a GPU, timing every
    configuration per signature would compile each for every test);
    test_triton_every_launch_configuration_cuda forces each configuration in turn."""
    if triton_available():
        from swin.ops import triton_window

        monkeypatch.setattr(triton_window, "FORCE_CONFIG", 0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_attn(version: int, dim: int, heads: int, window: int, seed: int, device="cpu") -> WindowAttention:
    """A WindowAttention with every parameter random (no zeros: biases, table, logit scale)."""
    g = torch.Generator().manual_seed(seed)
    attn = WindowAttention(dim, heads, window, version, qkv_bias=True, pretrained_window=0, attn_drop=0.0,
                           proj_drop=0.0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if version == 2:
            attn.logit_scale.copy_(torch.rand(attn.logit_scale.shape, generator=g) * 3.0 + 0.5)
    return attn.to(device)


# (H, W, window, shift): square, non-square, padded, shifted/unshifted, map smaller than the window
CASES = [(8, 8, 4, 0), (8, 8, 4, 2), (12, 8, 4, 2), (10, 7, 4, 2), (7, 7, 7, 3), (9, 13, 3, 1), (5, 11, 7, 3)]


def check_parity(backend, version, case, mask_padding, device, dtype, tol):
    H, Wd, window, shift = case
    attn = make_attn(version, dim=16 if version == 1 else 24, heads=2 if version == 1 else 3, window=window,
                     seed=H * 100 + Wd * 10 + window + version, device=device)
    torch.manual_seed(H + Wd)
    x = torch.randn(2, H, Wd, attn.dim, device=device)
    grad = None
    results = {}
    # the reference runs in fp32 on the same (dtype-rounded) weights and inputs: the error measured
    # is the fast path's own, not the sum of two low-precision paths
    attn = attn.to(dtype)
    names = ("reference", backend) if dtype == torch.float32 else ("reference", backend, "reference-lowp")
    for name in names:
        run_dtype = torch.float32 if name == "reference" else dtype
        a = copy.deepcopy(attn).to(run_dtype)
        a.backend = name.split("-")[0]
        xi = x.to(dtype).to(run_dtype).clone().requires_grad_(True)
        win, sh = W.window_and_shift(H, Wd, window, shift)
        with torch.autocast(device, dtype=dtype, enabled=False):
            out = a(xi, win, sh, mask_padding)
        if grad is None:
            grad = torch.randn(out.shape, device=device).to(dtype)
        out.backward(grad.to(run_dtype))
        results[name] = (out, xi.grad, {n: p.grad for n, p in a.named_parameters()})
    (o_r, gx_r, gp_r), (o_f, gx_f, gp_f) = results["reference"], results[backend]
    pairs = [("out", o_f, o_r), ("dx", gx_f, gx_r)] + [(n, gp_f[n], g) for n, g in gp_r.items()]
    lowp = results.get("reference-lowp")
    lowp_err = {}
    if lowp is not None:  # the reference path's own error at this precision, against fp32
        o_l, gx_l, gp_l = lowp
        lowp_err = {"out": rel_err(o_l, o_r), "dx": rel_err(gx_l, gx_r), **{n: rel_err(gp_l[n], g) for n, g in gp_r.items()}}
    assert torch.isfinite(o_f).all()
    for n, fast, ref in pairs:
        assert fast is not None, n
        err = rel_err(fast, ref)
        # low precision: within tol, or no worse than the reference path itself at that precision
        limit = max(tol, 2.0 * lowp_err.get(n, 0.0))
        if n == "logit_scale" and lowp is not None:
            # one number per head, a sum whose terms cancel (softmax rows): its bf16 error is noisy
            # for every path. Over 48 draws on an H200 the reference path's own error had median
            # 0.027 and max 0.16, SDPA's 0.023 / 0.15, Triton's 0.023 / 0.17 (benchmarks/
            # v2_logit_grad.py), so one draw against another is no test. A wrong formula is off by ~1;
            # the fp32 tests hold every path to 1e-4.
            limit = max(limit, 0.25)
        assert err <= limit, (n, err, lowp_err.get(n))


def check_linear_gelu(device, dtype, shapes, configs) -> list[float]:
    """fc1 with GELU in its epilogue (swin.ops.triton_linear) against the plain F.gelu(F.linear(...))
    on the same 16-bit operands, in fp32 (the kernel rounds fc1's output before GELU, as the plain
    path does): each (M, K, N, bias) shape, each launch configuration forced. Returns the errors."""
    from swin.ops import triton_window as T
    from swin.ops.triton_linear import linear_gelu, linear_gelu_reference

    errs = []
    for M, K, N, with_bias in shapes:
        g = torch.Generator().manual_seed(M + K + N)
        x = torch.randn(M, K, generator=g).to(device, dtype)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
        b = torch.randn(N, generator=g).to(device, dtype) if with_bias else None
        ref = linear_gelu_reference(x.float(), w.float(), None if b is None else b.float())
        old = T.FORCE_CONFIG
        try:
            for config in configs:
                T.FORCE_CONFIG = config
                out = linear_gelu(x, w, b)
                assert out.dtype == dtype and out.shape == (M, N)
                errs.append(rel_err(out.float(), ref))
        finally:
            T.FORCE_CONFIG = old
    return errs


def check_fused_block(version, case, mask_padding, device, dtype, tol, autocast=False):
    """backend "fused" (inference): each half of a block as one kernel, x + attn(LN1(x)) and
    x + MLP(LN2(x)) (V1; V2: x + LN1(attn(x)), x + LN2(MLP(x))), against the reference path in fp32
    on the same (dtype-rounded) weights and input. Compared: the change each half makes to x (the
    residual would hide errors); then the whole block against the SDPA path. ``autocast``: fp32
    weights and input under autocast to ``dtype``, as the bench runs. Returns the larger half error."""
    from swin.config import SwinConfig
    from swin.model import SwinTransformerBlock
    from swin.ops import fused_attention_half, fused_block_eligible, fused_mlp_half

    H, Wd, window, shift = case
    dim, heads = (32, 2) if version == 1 else (48, 3)
    cfg = SwinConfig(version=version, embed_dim=dim, depths=(2,), num_heads=(heads,), window_size=window,
                     mask_padding=mask_padding, img_size=(32, 32), drop_path_rate=0.0, backend="reference")
    torch.manual_seed(H * 100 + Wd * 10 + window + version)
    blk = SwinTransformerBlock(cfg, dim, heads, shift, 0, 0.0).eval()
    with torch.no_grad():
        for p in blk.parameters():  # off the init values (zero biases, unit norms) so that all of it counts
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, H, Wd, dim)
    store = torch.float32 if autocast else dtype
    blk, x = blk.to(device, store).float(), x.to(device, store).float()  # rounded to the stored dtype

    def attention(b, xi):
        if b.post_norm:
            return xi + b.norm1(b._shifted_window_attention(xi))
        return xi + b._shifted_window_attention(b.norm1(xi))

    def mlp(b, xi):
        return xi + (b.norm2(b.mlp(xi)) if b.post_norm else b.mlp(b.norm2(xi)))

    fused = copy.deepcopy(blk).to(store)
    fused.attn.backend = fused.mlp.backend = "fused"
    xf = x.to(store)
    errs, lowp_errs = [], []
    with torch.no_grad():
        for reference, kernel in ((attention, fused_attention_half), (mlp, fused_mlp_half)):
            ref = reference(blk, x) - x
            if dtype != torch.float32:  # the reference path's own error at this precision
                with torch.autocast(device, dtype=dtype, enabled=autocast):
                    lowp_errs.append(rel_err(reference(copy.deepcopy(blk).to(store), xf).float() - x, ref))
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                assert fused_block_eligible(fused, xf)
                out = kernel(fused, xf)
            assert out.dtype == xf.dtype and torch.isfinite(out).all()
            errs.append(rel_err(out.float() - x, ref))
            limit = max(tol, 2.0 * lowp_errs[-1]) if lowp_errs else tol
            assert errs[-1] <= limit, (reference.__name__, errs[-1], limit)
        plain = copy.deepcopy(fused)
        plain.attn.backend = plain.mlp.backend = "sdpa"
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            whole, expected = fused(xf), plain(xf)  # the block's forward takes the two kernels
    assert rel_err(whole.float(), expected.float()) <= max([tol] + [2.0 * e for e in lowp_errs])
    return max(errs, default=0.0)


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case,mask_padding", [((10, 7, 4, 2), True), ((7, 7, 7, 3), False), ((9, 13, 3, 1), False)])
@pytest.mark.parametrize("version", [1, 2])
def test_fused_block_matches_reference_cuda(version, case, mask_padding):
    check_fused_block(version, case, mask_padding, "cuda", torch.float32, 1e-4)
    check_fused_block(version, case, mask_padding, "cuda", torch.bfloat16, 1e-2)
    check_fused_block(version, case, mask_padding, "cuda", torch.bfloat16, 1e-2, autocast=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", [1, 2])
def test_sdpa_matches_reference_fp32(version, case, mask_padding, device):
    check_parity("sdpa", version, case, mask_padding, device, torch.float32, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("version", [1, 2])
def test_sdpa_matches_reference_bf16(version, case, device):
    check_parity("sdpa", version, case, False, device, torch.bfloat16, 1e-2)


# mask_padding only changes padded maps: pair it with those (fewer kernel compilations on the GPU)
TRITON_CASES = [(c, False) for c in CASES] + [(c, True) for c in CASES if c[0] % c[2] or c[1] % c[2]]


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case,mask_padding", TRITON_CASES)
@pytest.mark.parametrize("version", [1, 2])
def test_triton_matches_reference_fp32_cuda(version, case, mask_padding):
    check_parity("triton", version, case, mask_padding, "cuda", torch.float32, 1e-4)


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case", CASES[:4] + [(56, 56, 7, 3), (28, 20, 8, 4)])
@pytest.mark.parametrize("version", [1, 2])
def test_triton_matches_reference_bf16_cuda(version, case):
    check_parity("triton", version, case, False, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
def test_linear_gelu_matches_reference_cuda():
    """fc1 + GELU as one product, bf16 and fp16, every launch configuration, Swin-T's stage-1 and
    stage-4 fc1 shapes (at a small batch) and ragged ones (row tail, K = 48, no bias)."""
    from swin.ops.triton_linear import _TMA_FAILED, CONFIGS

    shapes = [(3136 * 2, 96, 384, True), (49 * 2, 768, 3072, True), (1000, 48, 96, False), (77, 192, 768, True)]
    for dtype in (torch.bfloat16, torch.float16):
        errs = check_linear_gelu("cuda", dtype, shapes, range(len(CONFIGS)))
        assert max(errs) <= 1e-2, (dtype, errs)
    if torch.cuda.get_device_capability()[0] >= 9:  # the TMA kernel built (a failure falls back with a warning)
        assert not _TMA_FAILED, _TMA_FAILED


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("config", range(4))
@pytest.mark.parametrize("version", [1, 2])
def test_triton_every_launch_configuration_cuda(version, config, monkeypatch):
    """The other tests check the configuration the timing picked; here each one is forced, on a map
    large enough (2 x 800 windows, padded, shifted) that every program of every configuration walks
    several windows."""
    from swin.ops import triton_window as T

    assert max(len(T.FWD_CONFIGS), len(T.BWD_CONFIGS)) == 4  # index % len: each is run
    monkeypatch.setattr(T, "FORCE_CONFIG", config)
    check_parity("triton", version, (224, 170, 7, 3), True, "cuda", torch.float32, 1e-4)
    check_parity("triton", version, (224, 170, 7, 3), False, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.skipif(not triton_available(), reason="needs Triton >= 3.6")
def test_triton_interpreted_matches_reference_on_cpu():
    """The Triton kernels, run by Triton's interpreter on the CPU (small sizes), equal the reference
    in fp32 and, within 1e-2, in fp16 (forward and backward), also inside torch.compile(fullgraph=True)
    (tests/triton_interpret_check.py)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpret_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 8 and set(report["compiled"]) == {"swin_micro", "swinv2_micro"}
    assert report["max_rel_err"] <= 1e-4, report
    assert report["fp16_cases"] == 3, report  # each within check_parity's low-precision bounds (1e-2)
    # backend "fused" (the attention half as one kernel): fp32 and fp16 per case; compiled model logits
    assert len(report["fused_block_errs"]) == 10 and max(report["fused_block_errs"][0::2]) <= 1e-4, report
    assert max(report["fused_block_errs"][1::2]) <= 1e-2 and report["fused_compiled"] <= 1e-4, report
    assert len(report["fused_autocast_errs"]) == 2 and max(report["fused_autocast_errs"]) <= 1e-2, report
    assert report["fused_eligible"] == {"eval_no_grad": True, "train_mode": False, "c192": False, "hooked": False,
                                        "replaced_proj": False, "grad_enabled": False}, report
    from swin.ops import triton_block as TB, triton_window as T  # kernel_bench ran every configuration

    # every launch configuration, and backend "fused"'s two one-kernel halves against separate calls (C <= 128)
    assert report["kernel_bench_rows"] == len(T.FWD_CONFIGS) + len(T.BWD_CONFIGS) + 4, report
    # every launch above under tests/triton_bounds.py (which must catch a load past a tensor), the
    # Swin-T stage-1 shape of backend "fused" under autocast among them, every launch configuration
    assert report["bounds_self_test"] is True and report["bounds"]["launches"] > 100, report
    assert len(report["fused_stage1"]) == 2 * (len(TB.BLOCK_CONFIGS) + len(TB.MLP_CONFIGS)), report
    assert max(report["fused_stage1"]) <= 1e-2, report
    # fc1 + GELU as one product: fp16, every configuration; a model under autocast, eager and compiled
    from swin.ops.triton_linear import CONFIGS as LINEAR_CONFIGS

    assert report["linear_bench_rows"] == len(LINEAR_CONFIGS) + 3, report  # kernel_bench's product table
    assert len(report["linear_gelu_errs"]) == 2 * len(LINEAR_CONFIGS) and max(report["linear_gelu_errs"]) <= 1e-2, report
    tma_configs = sum(1 for c in LINEAR_CONFIGS if c.get("tma"))  # the TMA kernel ran for each, both shapes
    assert tma_configs and report["linear_tma"] == {"launches": 2 * tma_configs, "failed": []}, report
    gm = report["gelu_epilogue_model"]
    assert gm["calls"] == gm["blocks"] > 0 and gm["grad_calls"] == 0 and gm["in_graph"] is True, report
    assert gm["err"] <= 1e-2 and gm["compiled_err"] <= 1e-2, report


@pytest.mark.parametrize("name,size", [("swin_t", 224), ("swin_t", 100), ("swinv2_t_w8", 160)])
def test_whole_model_logits_equal_reference(name, size):
    torch.manual_seed(0)
    model = swin.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model.set_backend("reference")
        ref = model(x)
        for backend in ("sdpa", "auto"):
            model.set_backend(backend)
            out = model(x)
            assert rel_err(out, ref) <= 1e-5, backend
            assert (out - ref).abs().max().item() <= 1e-4
        model.set_backend("reference")


def test_patch_embed_as_one_product_equals_convolution(monkeypatch):
    """On CUDA in 16-bit the stem's k = s = P convolution runs as one product over the gathered
    patches; forced here on the CPU in fp32: output and every gradient equal the convolution's
    (padded, non-square input); the "reference" backend and a hooked projection keep the
    convolution (and the hook fires); fp32 on the real setting keeps it too."""
    from swin.model import PatchEmbed

    torch.manual_seed(0)
    fast = PatchEmbed(4, 3, 32, backend="auto")
    with torch.no_grad():
        fast.norm.weight.add_(torch.randn(32) * 0.3)
    ref = copy.deepcopy(fast)
    ref.backend = "reference"
    convs = []
    real_forward = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda m, x: convs.append(1) or real_forward(m, x))
    monkeypatch.setattr(PatchEmbed, "PRODUCT_DEVICES", ("cpu",))
    monkeypatch.setattr(PatchEmbed, "PRODUCT_DTYPES", (torch.float32,))
    x = torch.randn(2, 3, 30, 21)
    outs = {}
    for name, module in (("fast", fast), ("ref", ref)):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))  # randn_like takes no generator before torch 2.7
        outs[name] = [out, xi.grad] + [p.grad for p in module.parameters()]
        if name == "fast":
            assert convs == [] and out.shape == (2, 8, 6, 32)
    assert convs == [1]
    for a, b in zip(outs["fast"], outs["ref"]):
        assert rel_err(a, b) <= 1e-5
    cl = x.contiguous(memory_format=torch.channels_last)  # another layout: the same patches
    assert rel_err(fast(cl), outs["ref"][0]) <= 1e-5 and convs == [1]
    monkeypatch.setattr(PatchEmbed, "PRODUCT_DTYPES", (torch.float16, torch.bfloat16))
    fast(x)  # fp32: the convolution
    assert convs == [1, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 16-bit: the product, within bf16 of it
        low = fast(x)
    assert convs == [1, 1] and low.dtype == torch.bfloat16 and rel_err(low.float(), outs["ref"][0]) <= 2e-2
    fired = []
    fast.proj.register_forward_hook(lambda m, i, o: fired.append(1))
    fast(x)
    assert fired == [1] and convs == [1, 1, 1]


# -- fc1 + GELU as one cuBLASLt call, 16-bit inference (swin.ops.mlp.addmm_gelu) ---------------
def _count_ops(fn, name: str) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += name in str(func)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _trained_scale_model(name: str, **kw) -> torch.nn.Module:
    """A model whose every parameter is moved off its initial value by about what training moves it
    (as tests/test_equivalence.py): random, at a scale where bf16 stays within ~1e-2 of fp32."""
    torch.manual_seed(0)
    model = swin.create_model(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim <= 1 or "logit_scale" in n else 0.02))
    return model


@pytest.mark.skipif(not TORCH_2_11, reason="compiled graphs as asserted here need torch >= 2.11")
def test_lt_gelu_mlp_is_the_plain_mlp_and_stays_whole_under_compile(monkeypatch):
    """Opted in on the CPU (where ``_addmm_activation`` computes the erf GELU, as the model): a bf16
    model's logits equal the plain path's, one call per block, also under autocast over fp32 weights;
    torch.compile keeps the call as one operator; fp32, autograd and the reference backend do not take
    it. (On CUDA the call computes GELU's tanh form: the next test bounds what that does to the logits.)"""
    from swin.model import Mlp
    from swin.ops import cpu_tiled

    monkeypatch.setattr(cpu_tiled, "eligible", lambda *a: False)  # the per-block path, where Mlp runs
    model = _random_model("swin_micro", num_classes=10)
    blocks = sum(len(layer.blocks) for layer in model.layers)
    x = torch.randn(2, 3, 64, 48)
    low = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        plain = low(x.bfloat16())
        with torch.autocast("cpu", torch.bfloat16):
            plain_autocast = model(x)
        assert Mlp.LT_GELU_DEVICES == ("cuda",)  # the default (stop 25, H200: 1.11-1.18x): not the CPU
        assert _count_ops(lambda: low(x.bfloat16()), "addmm_gelu") == 0
        monkeypatch.setattr(Mlp, "LT_GELU_DEVICES", ("cpu",))
        assert _count_ops(lambda: low(x.bfloat16()), "addmm_gelu") == blocks
        assert torch.equal(low(x.bfloat16()), plain)
        with torch.autocast("cpu", torch.bfloat16):
            assert _count_ops(lambda: model(x), "addmm_gelu") == blocks
            assert torch.equal(model(x), plain_autocast)
        assert _count_ops(lambda: model(x), "addmm_gelu") == 0  # fp32
        graphs = []
        compiled = torch.compile(low, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm)
        assert rel_err(compiled(x.bfloat16()).float(), plain.float()) <= 1e-2
        assert sum("addmm_gelu" in str(n.target) for g in graphs for n in g.graph.nodes) == blocks
    assert _count_ops(lambda: low(x.bfloat16()).sum().backward(), "addmm_gelu") == 0  # autograd on
    low.set_backend("reference")
    with torch.no_grad():
        assert _count_ops(lambda: low(x.bfloat16()), "addmm_gelu") == 0


def test_tanh_gelu_in_bf16_logits_as_close_to_fp32_as_erf():
    """cuBLASLt's epilogue GELU is the tanh form (within 4.7e-4 of the erf form). In a bf16 Swin-T and
    SwinV2-T (random weights of realistic scale, 224 / 256 inputs) the logits with it are as far from
    the fp32 model's as the bf16 model's with the exact GELU: the approximation is lost in bf16's own
    rounding (measured, tanh vs erf: Swin-T 6.2e-3 vs 7.0e-3, SwinV2-T 9.1e-3 vs 9.2e-3 of the logits' scale)."""
    from swin.model import Mlp

    x = F.gelu(torch.linspace(-8, 8, 100001), approximate="tanh") - F.gelu(torch.linspace(-8, 8, 100001))
    assert x.abs().max().item() <= 4.8e-4
    for name, size in (("swin_t", 224), ("swinv2_t_w8", 256)):
        model = _trained_scale_model(name, num_classes=1000, backend="reference")
        with torch.no_grad():
            img = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
            ref = model(img).double()
            low = model.bfloat16()
            err_erf = (low(img.bfloat16()).double() - ref).abs().max() / ref.abs().max()
            for m in low.modules():
                if isinstance(m, Mlp):
                    m.act.approximate = "tanh"
            err_tanh = (low(img.bfloat16()).double() - ref).abs().max() / ref.abs().max()
        assert err_erf <= 2e-2 and err_tanh <= 1.2 * err_erf, (name, err_erf, err_tanh)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_lt_gelu_cuda_is_the_tanh_gelu_of_the_product(monkeypatch):
    """On CUDA the one call equals F.gelu(F.linear(...), approximate="tanh") at Swin-T's stage-1 and
    stage-4 shapes (bf16, within a bf16 rounding), and a bf16 Swin-T opted in stays within bf16 of fp32."""
    from swin.model import Mlp
    from swin.ops.mlp import addmm_gelu

    g = torch.Generator(device="cuda").manual_seed(0)
    for M, C in ((6272, 96), (392, 768)):
        x = torch.randn(M, C, device="cuda", generator=g).bfloat16()
        w = (torch.randn(4 * C, C, device="cuda", generator=g) * C ** -0.5).bfloat16()
        b = torch.randn(4 * C, device="cuda", generator=g).bfloat16()
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        assert rel_err(addmm_gelu(x, w, b).float(), ref) <= 1e-2
    model = _trained_scale_model("swin_t", num_classes=10).cuda()
    img = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(img)
        low = model.bfloat16()
        monkeypatch.setattr(Mlp, "LT_GELU_DEVICES", ("cuda",))
        assert _count_ops(lambda: low(img.bfloat16()), "addmm_gelu") == 12
        assert rel_err(low(img.bfloat16()).float(), ref) <= 3e-2


# -- CPU inference, chunk by chunk in cache (swin.ops.cpu_tiled) -------------------------------
def _random_model(name: str, **kw) -> torch.nn.Module:
    """A model with every parameter random (LayerNorm affine, biases, tables, logit scales too)."""
    torch.manual_seed(0)
    model = swin.create_model(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if "logit_scale" not in n else 0.1))
    return model


@pytest.mark.parametrize("chunk_tokens", [16, 100, 2048])  # one window / a few / whole images per chunk
@pytest.mark.parametrize("name,size,mask_padding", [
    ("swin_micro", (32, 32), False), ("swin_micro", (46, 30), False), ("swin_micro", (46, 30), True),
    ("swinv2_micro", (32, 32), False), ("swinv2_micro", (38, 54), False), ("swinv2_micro", (38, 54), True),
    ("swin_micro", (10, 14), False)])  # maps smaller than the window
def test_cpu_tiled_inference_equals_reference(name, size, mask_padding, chunk_tokens, monkeypatch):
    from swin.ops import cpu_tiled

    monkeypatch.setattr(cpu_tiled, "CHUNK_TOKENS", chunk_tokens)
    calls = []
    run = cpu_tiled.run_blocks
    monkeypatch.setattr(cpu_tiled, "run_blocks", lambda blocks, x, **kw: calls.append(x.shape) or run(blocks, x, **kw))
    model = _random_model(name, mask_padding=mask_padding)
    x = torch.randn(3, 3, *size)
    with torch.inference_mode():
        fast = model(x)
        feats = model.forward_intermediates(x)
        model.set_backend("reference")
        ref = model(x)
        feats_ref = model.forward_intermediates(x)
    assert len(calls) == 2 * len(model.layers)  # every stage ran tiled, in both calls
    assert rel_err(fast, ref) <= 1e-5 and (fast - ref).abs().max() <= 1e-4 * ref.abs().max()
    for f, r in zip(feats, feats_ref):
        assert rel_err(f, r) <= 1e-5


# -- CPU window-attention kernel (swin.ops.cpu_kernels) --------------------------------------
def _cpu_kernel():
    import platform
    import shutil

    from swin.ops import cpu_kernels

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if not (platform.machine() == "x86_64" and " avx512f" in flags and shutil.which(os.environ.get("CC", "cc"))):
        pytest.skip("the CPU kernels need x86-64 with AVX-512 and a C compiler")
    assert cpu_kernels.available(), "the CPU kernels did not build here"  # not a silent skip where they should
    return cpu_kernels


# (windows, N, heads, d, per-window mask, q/k token stride in units of C): window 7 (N = 49: 48 keys
# in 7-row tiles and the 49th apart) shifted and not, with heads of 16 and 40 channels (40: 4-row tiles
# padded to 64 keys), other N one or two past a multiple of 16 (18, 34), window 8, 12 and 16 (rows
# longer than one register tile), head sizes that are not multiples of 16, one-token windows, q/k
# normalised into a (.., 2, heads, d) buffer
@pytest.mark.parametrize("windows,n,heads,d,per_window,qk_stride", [
    (6, 49, 3, 32, True, 3), (6, 49, 3, 32, False, 3), (3, 49, 2, 16, True, 3), (4, 18, 2, 8, True, 3),
    (3, 34, 3, 24, False, 2), (4, 64, 2, 32, True, 2), (3, 144, 2, 32, True, 3),
    (2, 256, 1, 64, False, 3), (5, 16, 2, 24, True, 3), (3, 49, 2, 40, False, 2), (4, 1, 2, 8, True, 3)])
def test_cpu_attention_kernel_equals_sdpa(windows, n, heads, d, per_window, qk_stride):
    ca = _cpu_kernel()
    g = torch.Generator().manual_seed(n * 100 + d)
    qk = torch.randn(windows, n, qk_stride, heads, d, generator=g)
    v = torch.randn(windows, n, 3, heads, d, generator=g)[:, :, 2]
    q, k = qk[:, :, 0], qk[:, :, 1]
    mask = torch.randn(windows if per_window else 1, heads, n, n, generator=g)
    if per_window:  # the shift mask's -100 entries (subnormal probabilities, flushed by the kernel)
        mask += torch.where(torch.rand(windows, 1, n, n, generator=g) < 0.4, -100.0, 0.0)
    scale = d ** -0.5
    assert ca.eligible(q, k, v, mask)
    out = ca.window_attention(q, k, v, mask, scale)  # (windows * n, heads * d)
    t = lambda x: x.double().transpose(1, 2)  # noqa: E731
    ref = torch.softmax(t(q) @ t(k).transpose(-2, -1) * scale + mask.double(), -1) @ t(v)
    ref = ref.transpose(1, 2).reshape(windows * n, heads * d)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=mask, scale=scale)
    sdpa = sdpa.transpose(1, 2).reshape(windows * n, heads * d)
    err, err_sdpa = ((out.double() - ref).abs().max() / ref.abs().max()).item(), ((sdpa.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= max(1e-6, 2 * err_sdpa), (err, err_sdpa)


@pytest.mark.parametrize("windows,n,heads,d,per_window,qk_stride", [
    (6, 49, 3, 32, True, 3), (3, 49, 2, 16, False, 3), (4, 64, 2, 32, True, 2), (3, 144, 2, 32, True, 3),
    (2, 256, 1, 64, False, 3)])
def test_cpu_attention_kernel_bf16_within_one_rounding(windows, n, heads, d, per_window, qk_stride):
    """bf16 q/k/v (under CPU autocast): the kernel computes in fp32 with an fp32 mask and rounds
    once, so each output is the exact attention of its bf16 inputs to within one bf16 rounding;
    bf16 SDPA rounds along the way. For training it also keeps the probabilities in fp32."""
    ca = _cpu_kernel()
    g = torch.Generator().manual_seed(n * 10 + d)
    qk = torch.randn(windows, n, qk_stride, heads, d, generator=g).bfloat16()
    v = torch.randn(windows, n, 3, heads, d, generator=g).bfloat16()[:, :, 2]
    q, k = qk[:, :, 0], qk[:, :, 1]
    mask = torch.randn(windows if per_window else 1, heads, n, n, generator=g)
    if per_window:
        mask += torch.where(torch.rand(windows, 1, n, n, generator=g) < 0.4, -100.0, 0.0)
    scale = d ** -0.5
    assert ca.mask_dtype(torch.bfloat16, n, d) == torch.float32 and ca.eligible(q, k, v, mask)
    out = ca.window_attention(q, k, v, mask, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (windows * n, heads * d)
    t = lambda x: x.double().transpose(1, 2)  # noqa: E731
    ref = torch.softmax(t(q) @ t(k).transpose(-2, -1) * scale + mask.double(), -1) @ t(v)
    ref = ref.transpose(1, 2).reshape(windows * n, heads * d)
    assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6 * ref.abs().max()).all()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=mask.bfloat16(), scale=scale)
    sdpa = sdpa.transpose(1, 2).reshape(windows * n, heads * d)
    assert (out.double() - ref).abs().max() <= (sdpa.double() - ref).abs().max()
    # training keeps the probabilities, in fp32
    out_p, probs = ca.window_attention(q, k, v, mask, scale, probs=True)
    ref_p = torch.softmax(t(q) @ t(k).transpose(-2, -1) * scale + mask.double(), -1)
    assert torch.equal(out_p, out) and probs.dtype == torch.float32 and (probs.double() - ref_p).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("windows,n,heads,d,per_window", [(6, 64, 3, 32, True), (4, 49, 2, 16, False),
                                                          (3, 144, 2, 32, True)])
def test_cpu_attention_kernel_cosine_equals_normalised(dtype, windows, n, heads, d, per_window):
    """V2's cosine attention inside the kernel (inference): q and k unit-normalised per row, q times
    exp(logit_scale) per head, against that computed in fp64 from the same inputs; fp32 as close as
    SDPA on the reference path's normalised q and k, bf16 within one rounding. A tiny row (norm below
    1e-12) is clamped as F.normalize does."""
    from swin.ops import sdpa

    ca = _cpu_kernel()
    g = torch.Generator().manual_seed(n + d + heads)
    qkv = torch.randn(windows, n, 3, heads, d, generator=g)
    qkv[0, 0, 0, 0] = 1e-14  # one q row whose norm is clamped
    qkv = qkv.to(dtype)
    logit = torch.rand(heads, generator=g) * 3 + 1  # exp(logit_scale) in [1, 4]
    mask = torch.randn(windows if per_window else 1, heads, n, n, generator=g)
    if per_window:
        mask += torch.where(torch.rand(windows, 1, n, n, generator=g) < 0.4, -100.0, 0.0)
    q, k, v = qkv.unbind(2)
    assert ca.cosine_eligible(dtype, d) and ca.eligible(q, k, v, mask)
    out = ca.window_attention(q, k, v, mask, 1.0, cosine=logit)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    t = lambda x: x.double().transpose(1, 2)  # noqa: E731
    qn, kn = unit(t(q)) * logit.double().view(heads, 1, 1), unit(t(k))
    ref = (torch.softmax(qn @ kn.transpose(-2, -1) + mask.double(), -1) @ t(v)).transpose(1, 2).reshape(windows * n, heads * d)
    if dtype == torch.float32:
        class Attn:  # what split_qkv reads of a V2 WindowAttention
            version, num_heads, logit_scale = 2, heads, logit.log().view(heads, 1, 1)
        q2, k2, v2, _ = sdpa.split_qkv(Attn, qkv)
        sdpa_out = torch.nn.functional.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2),
                                                                    v2.transpose(1, 2), attn_mask=mask, scale=1.0)
        sdpa_out = sdpa_out.transpose(1, 2).reshape(windows * n, heads * d)
        err, err_sdpa = ((out.double() - ref).abs().max() / ref.abs().max()).item(), ((sdpa_out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= max(1e-6, 2 * err_sdpa), (err, err_sdpa)
    else:
        assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6 * ref.abs().max()).all()
    with pytest.raises(ValueError, match="inference only"):
        ca.window_attention(q, k, v, mask, 1.0, probs=True, cosine=logit)


def test_cpu_attention_kernel_bf16_in_the_model(monkeypatch):
    """Under CPU bf16 autocast every block's attention is the kernel's bf16 form (the mask built in
    fp32 for it); the logits are as close to fp32 as the SDPA path's under the same autocast."""
    ca = _cpu_kernel()
    calls = []
    kernel = ca.window_attention
    monkeypatch.setattr(ca, "window_attention", lambda *a, **kw: calls.append(a[0].dtype) or kernel(*a, **kw))
    torch.manual_seed(0)
    model = swin.create_model("swin_t", num_classes=10).eval()
    x = torch.randn(2, 3, 112, 144)  # padded maps and shifted windows at every stage
    with torch.inference_mode():
        exact = model(x)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x).float()
            n_calls = len(calls)
            mask_dtype = ca.mask_dtype
            monkeypatch.setattr(ca, "mask_dtype", lambda dtype, n, d: dtype if dtype == torch.bfloat16 else mask_dtype(dtype, n, d))
            sdpa = model(x).float()  # bf16 masks: the kernel is not eligible, SDPA runs
    assert n_calls >= sum(model.config.depths) and set(calls) == {torch.bfloat16} and len(calls) == n_calls  # per chunk
    assert rel_err(fast, exact) <= 1.3 * rel_err(sdpa, exact) + 1e-3 and rel_err(fast, exact) <= 3e-2


@pytest.mark.parametrize("shape", [(2048, 384), (37, 5), (1, 1)])
def test_cpu_gelu_and_grad_kernel_equals_torch(shape):
    """GELU's recomputed forward and its gradient in one pass: as close to fp64 as PyTorch's own."""
    ck = _cpu_kernel()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g) * 4  # |h| up to ~16: erf saturates, exp(-h^2/2) underflows
    grad = torch.randn(shape, generator=g)
    d = grad.clone()
    a = ck.gelu_and_grad_(h, d)
    ref_a, ref_d = torch.nn.functional.gelu(h.double()), torch.ops.aten.gelu_backward(grad.double(), h.double())
    torch_a, torch_d = torch.nn.functional.gelu(h), torch.ops.aten.gelu_backward(grad, h)
    for out, ref, theirs in ((a, ref_a, torch_a), (d, ref_d, torch_d)):
        err, err_torch = (out.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()
        assert err <= max(2 * err_torch, 1e-6), (err, err_torch)
    # bf16 (autocast training): fp32 inside, each result within one bf16 rounding of fp64
    hb, gb = h.bfloat16(), grad.bfloat16()
    if ck.gelu_grad_eligible(hb, gb):  # (sizes that are a multiple of 16)
        db = gb.clone()
        ab = ck.gelu_and_grad_(hb, db)
        ref_a, ref_d = torch.nn.functional.gelu(hb.double()), torch.ops.aten.gelu_backward(gb.double(), hb.double())
        for out, ref in ((ab, ref_a), (db, ref_d)):
            assert out.dtype == torch.bfloat16
            assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6).all()
    else:
        assert hb.numel() % 16


@pytest.mark.parametrize("rows,C", [(300, 128), (37, 40), (5, 1), (0, 16)])
def test_cpu_row_kernels_equal_torch(rows, C):
    """The chunked inference path's row kernels: gather + LayerNorm + bias copy, the in-place norm +
    bias add, the accumulating norm (V2) and the scatter, against PyTorch's ops (the fallback path),
    at channel counts that are and are not multiples of 16."""
    ck = _cpu_kernel()
    g = torch.Generator().manual_seed(rows + C)
    src = torch.randn(2 * rows + 3, C, generator=g) * 3 + 1  # an offset mean: the variance's two passes
    idx = torch.randperm(src.shape[0], generator=g)[:rows]
    norm = torch.nn.LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    bias = torch.randn(C, generator=g)
    acc0 = torch.randn(rows, C, generator=g)

    def both(fn):  # fn(impl, src, out, copy, acc) on fresh buffers: (returned, copy, acc, src) for the kernel, then PyTorch
        results = []
        for impl in (ck.norm_rows, ck.norm_rows_reference):
            s, copy, acc = src.clone(), torch.full((rows, C), 7.0), acc0.clone()
            y = fn(impl, s, torch.full((rows, C), 7.0), copy, acc)
            results.append((y, copy, acc, s))
        return results

    def close(a, b):
        return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()) if a.numel() else True

    with torch.no_grad():
        ref_norm = torch.nn.functional.layer_norm(src[idx], (C,), norm.weight, norm.bias, norm.eps)
        # V1's first call: h = norm(src[idx]), copy = src[idx] + bias
        (h, copy, _, _), (rh, rcopy, _, _) = both(lambda f, s, h, c, a: f(s, norm, h, index=idx, copy=c, copy_bias=bias))
        assert close(h, ref_norm) and close(rh, ref_norm) and torch.equal(copy, src[idx] + bias) and torch.equal(rcopy, copy)
        # V1's second: h = norm(x), then x += bias in place
        (h, _, _, s), (rh, _, _, rs) = both(lambda f, s, h, c, a: f(s[:rows], norm, h, copy=s[:rows], copy_bias=bias))
        ref = torch.nn.functional.layer_norm(src[:rows], (C,), norm.weight, norm.bias, norm.eps)
        assert close(h, ref) and close(rh, ref) and torch.equal(s[:rows], src[:rows] + bias) and torch.equal(rs, s)
        # an in-place norm (V2's patch merging)
        (h, _, _, s), (rh, _, _, _) = both(lambda f, s, h, c, a: f(s[:rows], norm, s[:rows]))
        assert close(h, ref) and close(rh, ref)
        # V2: acc += norm(src[idx]), returned; and a plain gather
        (y, _, acc, _), (ry, _, racc, _) = both(lambda f, s, h, c, a: f(s, norm, a, index=idx, accumulate=True))
        assert close(acc, acc0 + ref_norm) and close(racc, acc) and y is acc and ry is racc
        (y, copy, _, _), (ry, rcopy, _, _) = both(lambda f, s, h, c, a: f(s, None, index=idx, copy=c))
        assert y is None and ry is None and torch.equal(copy, src[idx]) and torch.equal(rcopy, copy)
        dst, rdst = src.clone(), src.clone()
        rows_in = torch.randn(rows, C, generator=g)
        ck.scatter_rows(dst, idx, rows_in)
        rdst.index_copy_(0, idx, rows_in)
        assert torch.equal(dst, rdst)


@pytest.mark.parametrize("rows,C", [(300, 128), (37, 96), (5, 40), (0, 16)])
def test_cpu_row_kernels_bf16_round_once(rows, C):
    """The row kernels on bf16 rows (the chunked path under CPU autocast; C = 40 is not a multiple of 16
    and takes PyTorch's ops): LayerNorm computed in fp32 and rounded once, so within one bf16 rounding
    of the fp32 norm of the same bf16 inputs and no farther from it than PyTorch's bf16 ops; the bias
    copies, the gather and the scatter exact."""
    ck = _cpu_kernel()
    assert ck.rows_bf16_eligible(C) == (C % 16 == 0)
    g = torch.Generator().manual_seed(rows + C)
    src = (torch.randn(2 * rows + 3, C, generator=g) * 3 + 1).bfloat16()
    idx = torch.randperm(src.shape[0], generator=g)[:rows]
    norm = torch.nn.LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    bias = torch.randn(C, generator=g).bfloat16()
    acc0 = torch.randn(rows, C, generator=g).bfloat16()

    def within_one_rounding(y, exact, theirs):
        err, err_theirs = (y.float() - exact).abs(), (theirs.float() - exact).abs()
        return bool((err <= 2.0 ** -8 * exact.abs() + 1e-6).all()) and err.sum() <= err_theirs.sum() if y.numel() else True

    with torch.no_grad():
        exact = torch.nn.functional.layer_norm(src[idx].float(), (C,), norm.weight, norm.bias, norm.eps)
        out = {}
        for impl in (ck.norm_rows, ck.norm_rows_reference):
            h, copy = torch.full((rows, C), 7.0).bfloat16(), torch.full((rows, C), 7.0).bfloat16()
            y = impl(src, norm, h, index=idx, copy=copy, copy_bias=bias)
            acc = acc0.clone()
            impl(src, norm, acc, index=idx, accumulate=True)
            out[impl] = (y, copy, acc)
        (y, copy, acc), (ry, rcopy, racc) = out[ck.norm_rows], out[ck.norm_rows_reference]
        assert y.dtype == torch.bfloat16
        assert torch.equal(copy, (src[idx].float() + bias.float()).bfloat16()) and torch.equal(copy, rcopy)
        if ck.rows_bf16_eligible(C):
            assert within_one_rounding(y, exact, ry) and within_one_rounding(acc, acc0.float() + exact, racc)
        else:  # PyTorch's ops on both sides (its accumulate rounds the norm, then the sum)
            assert torch.equal(y, ry) and torch.equal(acc, racc)
        dst, rdst = src.clone(), src.clone()
        ck.scatter_rows(dst, idx, copy)
        rdst.index_copy_(0, idx, copy)
        assert torch.equal(dst, rdst)


@pytest.mark.parametrize("version,H,W,C", [(1, 6, 8, 16), (1, 5, 7, 24), (2, 7, 4, 8), (2, 1, 1, 40)])
def test_cpu_patch_merging_kernel_equals_module(version, H, W, C, monkeypatch):
    """Patch merging's 2 x 2 gather (+ V1's norm) as one C pass: the same rows as PyTorch's permuted
    copy, zeros past an odd edge, and the module's output equal to its plain path."""
    ck = _cpu_kernel()
    from swin.model import PatchMerging
    from swin.ops import cpu_tiled

    g = torch.Generator().manual_seed(H * W + C)
    x = torch.randn(3, H, W, C, generator=g) * 2 + 0.5
    assert torch.equal(ck.merge_rows(x), ck.merge_rows_reference(x))
    pm = PatchMerging(C, version, backend="auto").eval()
    with torch.no_grad():
        for p in pm.parameters():
            p.normal_(generator=g)
    if version == 1:
        fast, ref = ck.merge_rows(x, pm.norm), ck.merge_rows_reference(x, pm.norm)
        assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.inference_mode():
        assert cpu_tiled.merge_eligible(pm, x)
        fast = pm(x)
        monkeypatch.setattr(cpu_tiled, "merge_eligible", lambda *a: False)
        ref = pm(x)
    assert fast.shape == ref.shape == (3, (H + 1) // 2, (W + 1) // 2, 2 * C)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    x.requires_grad_(True)
    assert not cpu_tiled.merge_eligible(pm, x)  # autograd needs the plain path


# (batch, windows per image, N, heads, d, mask windows, mask trains): window 7 shifted (a mask per
# window) and not (one bias for all), window 8, small windows and odd head sizes, one-token windows,
# a frozen mask (no logits gradient written), window 12 (N = 144: past the backward kernel's 64)
@pytest.mark.parametrize("B,nW,n,heads,d,mw,mask_grad", [
    (2, 4, 49, 3, 32, 4, True), (2, 4, 49, 3, 32, 1, True), (1, 3, 64, 2, 16, 3, True), (2, 2, 9, 4, 20, 1, True),
    (1, 2, 64, 1, 64, 2, True), (3, 1, 1, 2, 8, 1, True), (2, 4, 49, 3, 32, 4, False), (1, 2, 144, 2, 32, 2, True)])
def test_cpu_attention_backward_kernel_equals_fp64(monkeypatch, B, nW, n, heads, d, mw, mask_grad):
    """The training attention's backward (dq, dk, dv and the mask's gradient from the forward's
    probabilities): as close to fp64 as the plain PyTorch backward, which windows over 64 tokens keep."""
    ca = _cpu_kernel()
    from swin.ops.sdpa import _CpuKernelAttention

    calls = []
    kernel = ca.window_attention_backward
    monkeypatch.setattr(ca, "window_attention_backward", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(n * 10 + d)
    qkv = torch.randn(B, nW, n, 3, heads, d, generator=g)
    mask = torch.randn(mw, heads, n, n, generator=g)
    if mw > 1:  # the shift mask's -100 entries
        mask += torch.where(torch.rand(mw, 1, n, n, generator=g) < 0.4, -100.0, 0.0)
    grad = torch.randn(B, nW * n, heads * d, generator=g)
    scale = d ** -0.5

    def grads(dtype, use_kernel):
        leaf, m = qkv.to(dtype).requires_grad_(), mask.to(dtype).requires_grad_(mask_grad)
        q, k, v = leaf[:, :, :, 0], leaf[:, :, :, 1], leaf[:, :, :, 2]
        if use_kernel:
            out = _CpuKernelAttention.apply(q, k, v, m, scale)
        else:
            t = lambda x: x.transpose(2, 3)  # noqa: E731
            p = torch.softmax(t(q) @ t(k).transpose(-2, -1) * scale + (m if mw == 1 else m.unsqueeze(0)), -1)
            out = t(p @ t(v)).reshape(B, nW * n, heads * d)
        return torch.autograd.grad(out, (leaf, m) if mask_grad else (leaf,), grad.to(dtype))

    ref = grads(torch.float64, False)
    plain = grads(torch.float32, False)
    with_kernel = grads(torch.float32, True)
    assert len(calls) == (1 if n <= ca.MAX_BACKWARD_TOKENS else 0)
    calls.clear()
    # V1 passes the qkv projection itself: its gradient in one buffer, the same values
    leaf, m = qkv.clone().requires_grad_(), mask.clone().requires_grad_(mask_grad)
    out = _CpuKernelAttention.apply(None, None, None, m, scale, leaf)
    packed = torch.autograd.grad(out, (leaf, m) if mask_grad else (leaf,), grad)
    assert packed[0].is_contiguous() and packed[0].shape == qkv.shape
    for a, b in zip(packed, with_kernel):
        assert torch.equal(a, b)
    if n <= ca.MAX_BACKWARD_TOKENS:  # an expanded output gradient (stride 0, from out.sum()) is read right
        leaf = qkv.clone().requires_grad_()
        out = _CpuKernelAttention.apply(leaf[:, :, :, 0], leaf[:, :, :, 1], leaf[:, :, :, 2], mask, scale)
        summed = torch.autograd.grad(out.sum(), leaf, retain_graph=True)[0]
        assert torch.allclose(summed, torch.autograd.grad(out, leaf, torch.ones_like(out))[0], rtol=0, atol=1e-6)
    if n > ca.MAX_BACKWARD_TOKENS:  # called directly anyway: a clear error, not a stack overflow
        q = qkv.flatten(0, 1)[:, :, 0]
        with pytest.raises(ValueError, match="at most 64 tokens"):
            kernel(q, q, q, torch.rand(B * nW, heads, n, n), grad.view(B * nW, n, heads, d), scale)
    for ours, theirs, r in zip(with_kernel, plain, ref):
        scale_r = r.abs().max().clamp_min(1e-30)
        err, err_plain = ((ours.double() - r).abs().max() / scale_r).item(), ((theirs.double() - r).abs().max() / scale_r).item()
        assert err <= max(1e-6, 2 * err_plain), (err, err_plain)


@pytest.mark.parametrize("B,nW,n,heads,d,mw,packed", [(2, 4, 49, 3, 32, 4, True), (1, 3, 64, 2, 16, 1, False)])
def test_cpu_attention_backward_kernel_bf16(monkeypatch, B, nW, n, heads, d, mw, packed):
    """bf16 training (autocast): the kernels take bf16 q/k/v and output gradient with an fp32 mask,
    keep fp32 probabilities, compute in fp32 and round dq, dk, dv once to bf16: each within one bf16
    rounding of the fp64 gradients of the same bf16 inputs; the mask's gradient (fp32) as close as
    the fp32 kernel's."""
    ca = _cpu_kernel()
    from swin.ops.sdpa import _CpuKernelAttention

    calls = []
    kernel = ca.window_attention_backward
    monkeypatch.setattr(ca, "window_attention_backward", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    g = torch.Generator().manual_seed(n + d)
    qkv = torch.randn(B, nW, n, 3, heads, d, generator=g).bfloat16()
    mask = torch.randn(mw, heads, n, n, generator=g)
    if mw > 1:
        mask += torch.where(torch.rand(mw, 1, n, n, generator=g) < 0.4, -100.0, 0.0)
    grad = torch.randn(B, nW * n, heads * d, generator=g).bfloat16()
    scale = d ** -0.5

    def grads(dtype, mask_dtype, use_kernel):
        leaf, m = qkv.to(dtype).requires_grad_(), mask.to(mask_dtype).requires_grad_()
        q, k, v = leaf.unbind(3)
        if use_kernel:
            out = _CpuKernelAttention.apply(None, None, None, m, scale, leaf) if packed else _CpuKernelAttention.apply(q, k, v, m, scale)
        else:
            t = lambda x: x.transpose(2, 3)  # noqa: E731
            p = torch.softmax(t(q) @ t(k).transpose(-2, -1) * scale + (m if mw == 1 else m.unsqueeze(0)), -1)
            out = t(p @ t(v)).reshape(B, nW * n, heads * d)
        return out, torch.autograd.grad(out, (leaf, m), grad.to(dtype))

    out_ref, (dqkv_ref, dm_ref) = grads(torch.float64, torch.float64, False)
    out, (dqkv, dm) = grads(torch.bfloat16, torch.float32, True)
    _, (_, dm32) = grads(torch.float32, torch.float32, True)
    assert calls == [torch.bfloat16, torch.float32] and out.dtype == dqkv.dtype == torch.bfloat16 and dm.dtype == torch.float32
    assert ((out.double() - out_ref).abs() <= 2.0 ** -8 * out_ref.abs() + 1e-6 * out_ref.abs().max()).all()
    assert ((dqkv.double() - dqkv_ref).abs() <= 2.0 ** -8 * dqkv_ref.abs() + 1e-5 * dqkv_ref.abs().max()).all()
    err = lambda a: ((a.double() - dm_ref).abs().max() / dm_ref.abs().max()).item()  # noqa: E731
    assert err(dm) <= max(1e-5, 2 * err(dm32)), (err(dm), err(dm32))


def test_cpu_bf16_autocast_training_takes_the_kernels(monkeypatch):
    """A Swin-T training step under CPU bf16 autocast runs every block's attention forward and
    backward in the C kernels (bf16 in and out, fp32 inside); the gradients are as close to fp32
    training's as the plain bf16 path's (batched products and softmax in bf16)."""
    ca = _cpu_kernel()
    calls = []
    kernel = ca.window_attention_backward
    monkeypatch.setattr(ca, "window_attention_backward", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    torch.manual_seed(0)
    model = swin.create_model("swin_t", num_classes=10, drop_path_rate=0.0).train()
    x, y = torch.randn(2, 3, 112, 112), torch.tensor([1, 7])

    def grads(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()  # every block's backward runs (the stem's weights need it)
        return [t.grad.float() for i in range(4) for t in (model.layers[i].blocks[-1].attn.qkv.weight,
                                                           model.layers[i].blocks[-1].attn.relative_position_bias_table)]

    exact = grads(False)
    calls.clear()
    fast = grads(True)
    assert calls == [torch.bfloat16] * sum(model.config.depths)
    monkeypatch.setattr(ca, "MAX_BACKWARD_TOKENS", 0)  # bf16 then takes the plain path
    plain = grads(True)
    assert len(calls) == sum(model.config.depths)
    for f, p, e in zip(fast, plain, exact):
        assert rel_err(f, e) <= 1.5 * rel_err(p, e) + 5e-3, (rel_err(f, e), rel_err(p, e))


def test_cpu_attention_kernel_in_the_model_and_without_it(monkeypatch):
    """Full-size Swin-T and SwinV2-T stages call the kernel for every chunk (V2's with its q/k
    normalisation inside); without the kernel (no compiler, another CPU, SWIN_CPU_KERNELS=0) the same
    model takes SDPA, with the same logits."""
    ca = _cpu_kernel()
    calls = []
    kernel = ca.window_attention
    monkeypatch.setattr(ca, "window_attention", lambda *a, **kw: calls.append((a[0].shape, "cosine" in kw)) or kernel(*a, **kw))
    for name, size in [("swin_t", 224), ("swinv2_t_w8", 256)]:
        model = _random_model(name, num_classes=10)
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            fast = model(x)
            n_calls = len(calls)
            monkeypatch.setattr(ca, "_lib", False)  # as if the build had failed
            sdpa = model(x)
            monkeypatch.undo()
            monkeypatch.setattr(ca, "window_attention", lambda *a, **kw: calls.append((a[0].shape, "cosine" in kw)) or kernel(*a, **kw))
            model.set_backend("reference")
            ref = model(x)
            ref64 = model.double()(x.double())
        assert n_calls >= sum(model.config.depths) and len(calls) == n_calls  # none on the SDPA run
        assert {cosine for _, cosine in calls} == {model.config.version == 2}
        calls.clear()
        # perturbed weights amplify fp32 rounding over the blocks (the reference is ~1e-4 from fp64
        # here): each path must be as close to the fp64 truth as the reference path is
        for out in (fast, sdpa):
            assert rel_err(out, ref64) <= 1.2 * rel_err(ref, ref64) + 1e-6 and rel_err(out, ref) <= 1e-3


def test_cpu_attention_kernel_build_failure_falls_back(monkeypatch, tmp_path):
    """No C compiler: available() says False (SDPA is used) instead of raising; a build goes to a
    temporary file first, so an interrupted build never leaves a half-written library behind."""
    from swin.ops import cpu_kernels as ca

    monkeypatch.setattr(ca, "_lib", None)
    monkeypatch.setenv("SWIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be built .*no-such-compiler.*Set CC"):  # said once
        assert ca.available() is False
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ca, "_lib", None)
    monkeypatch.setenv("SWIN_CPU_KERNELS", "0")
    monkeypatch.delenv("CC")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: quiet
        assert ca.available() is False


def test_cpu_kernels_build_from_scratch(monkeypatch, tmp_path):
    """A fresh cache: the library is compiled, renamed into place (nothing else left) and loads."""
    _cpu_kernel()
    from swin.ops import cpu_kernels as ca

    monkeypatch.setattr(ca, "_lib", None)
    monkeypatch.setenv("SWIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "env " + (os.environ.get("CC") or "cc"))  # a compiler command with arguments
    assert ca.available() is True
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".so"


def test_cpu_kernel_ab_script_runs_both_modes(capsys):
    """benchmarks/cpu_ab.py (two builds of the C kernels side by side in one process), smallest sizes:
    a ratio per kernel case and per model, the in-tree library back in place afterwards, and a clear
    error for a revision git does not know."""
    ca = _cpu_kernel()
    import importlib.util

    spec = importlib.util.spec_from_file_location("cpu_ab", ROOT / "benchmarks" / "cpu_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    built = ca._lib
    assert ab.main(["--a", "-", "--b", "-", "kernel", "--shapes", "2x2x49", "--rounds", "2"]) == 0
    assert ab.main(["--a", "-", "--b", "-", "model", "--models", "swin_micro", "--pairs", "1", "--batch", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("|") and "x |" in line]
    assert len(rows) == 4 + 1, rows  # forward/backward x hot/rotated, and the model
    assert ca._lib is built
    with pytest.raises(ValueError, match="git cannot show"):
        ab.c_source("no-such-revision")


@pytest.mark.parametrize("backend", ["triton", "fused"])
def test_cpu_tiled_serves_the_cuda_backends_on_cpu(backend, monkeypatch):
    """A model set to a CUDA-kernel backend and run on the CPU takes the chunked path, as "auto" does,
    not the slower per-block SDPA path (unless Triton's interpreter runs the kernels)."""
    from swin.ops import cpu_tiled, triton_available

    if not triton_available():
        pytest.skip("backends triton/fused need the triton package")
    calls = []
    run = cpu_tiled.run_blocks
    monkeypatch.setattr(cpu_tiled, "run_blocks", lambda blocks, x, **kw: calls.append(x.shape) or run(blocks, x, **kw))
    model = _random_model("swinv2_micro", backend=backend)
    x = torch.randn(2, 3, 30, 38)
    with torch.inference_mode():
        fast = model(x)
        model.set_backend("reference")
        ref = model(x)
    assert len(calls) == len(model.layers) and rel_err(fast, ref) <= 1e-5


def test_cpu_tiled_full_size_swin_t_and_bf16():
    model = _random_model("swin_t", num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fast = model(x)
        model.set_backend("reference")
        ref = model(x)
        ref64 = model.double()(x.double())
    # 12 blocks of perturbed weights amplify fp32 rounding (the reference is 3e-4 from fp64 here):
    # the tiled path must be as close to the fp64 truth as the reference path is
    assert rel_err(fast, ref64) <= 1.2 * rel_err(ref, ref64)
    assert rel_err(fast, ref) <= 1e-3
    # a bf16 model end to end (default init: random perturbed weights amplify bf16 rounding chaotically)
    torch.manual_seed(0)
    model = swin.create_model("swin_t", num_classes=10).eval().bfloat16()
    with torch.inference_mode():
        fast16 = model(x.bfloat16()).float()
        model.float().set_backend("reference")
        ref = model(x)  # the same (bf16-rounded) weights, in fp32
    assert rel_err(fast16, ref) <= 3e-2


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("name,size", [("swin_micro", (46, 30)), ("swinv2_micro", (38, 54))])
def test_cpu_tiled_under_bf16_autocast(name, size, onednn, monkeypatch):
    """Under CPU autocast (bf16) every stage runs tiled in bf16, on weight copies made once and
    renewed after a weight change; the logits are as far from fp32 as the reference path's under
    the same autocast."""
    from swin.ops import cpu_tiled

    monkeypatch.setattr(cpu_tiled, "USE_ONEDNN", onednn)
    calls = []
    run = cpu_tiled.run_blocks
    monkeypatch.setattr(cpu_tiled, "run_blocks", lambda blocks, x, **kw: calls.append(x.dtype) or run(blocks, x, **kw))
    torch.manual_seed(0)
    model = swin.create_model(name).eval()
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(2, 3, *size)
    for step in range(2):
        with torch.inference_mode():
            exact = ref(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast, slow = model(x), ref(x)
        assert calls == [torch.bfloat16] * len(model.layers) and fast.dtype == torch.bfloat16
        assert rel_err(fast.float(), exact) <= 1.3 * rel_err(slow.float(), exact) + 1e-3
        assert rel_err(fast.float(), exact) <= 3e-2
        calls.clear()
        with torch.no_grad():  # the cached bf16 copies must follow a weight change
            for m in (model, ref):
                m.layers[0].blocks[0].mlp.fc2.weight.mul_(3.0)
                m.layers[0].blocks[0].attn.qkv.weight.mul_(0.5)


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_cpu_tiled_every_product_prepacked(name, monkeypatch):
    """Where oneDNN is present, qkv, proj, fc1, fc2 and patch merging's reduction each run as one
    oneDNN call on a prepacked weight (none silently falls back to addmm), with the logits of the
    addmm path and of the reference."""
    from swin.ops import cpu_tiled

    if not cpu_tiled._onednn_ok(torch.float32):
        pytest.skip("PyTorch built without oneDNN's linear ops")
    model = _random_model(name)
    x = torch.randn(2, 3, 40, 24)
    packed = []
    build = cpu_tiled._packed_weight
    monkeypatch.setattr(cpu_tiled, "_packed_weight", lambda lin, h: packed.append(build(lin, h)) or packed[-1])
    with torch.inference_mode():
        fast = model(x)
        monkeypatch.setattr(cpu_tiled, "USE_ONEDNN", False)
        plain = model(x)
        model.set_backend("reference")
        ref = model(x)
    blocks = sum(len(layer.blocks) for layer in model.layers)
    mergings = sum(layer.downsample is not None for layer in model.layers)
    assert len(packed) >= 4 * blocks + mergings and all(p is not None for p in packed)
    assert rel_err(fast, ref) <= 1e-5 and rel_err(plain, ref) <= 1e-5


def test_cpu_tiled_fc1_gelu_both_ways_and_model_still_copies(monkeypatch):
    from swin.ops import cpu_tiled

    model = _random_model("swin_micro")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        outs = []
        for flag in (False, True):  # plain addmm + GELU, then oneDNN's fused call where present
            monkeypatch.setattr(cpu_tiled, "USE_ONEDNN", flag)
            outs.append(model(x))
        model.set_backend("reference")
        ref = model(x)
    for out in outs:
        assert rel_err(out, ref) <= 1e-5
    copy.deepcopy(model)  # no opaque oneDNN tensors on the modules
    torch.save(model, __import__("io").BytesIO())
    with torch.no_grad():  # a weight update invalidates the packed copy
        model.layers[0].blocks[0].mlp.fc1.weight.mul_(2.0)
        model.set_backend("auto")
        fast = model(x)
        model.set_backend("reference")
        assert rel_err(fast, model(x)) <= 1e-5


def test_cpu_tiled_overwrites_only_inputs_handed_over():
    from swin.ops import cpu_tiled

    model = _random_model("swin_micro")
    layer, x = model.layers[0], torch.randn(2, 16, 16, 48)
    x0 = x.clone()
    with torch.inference_mode():
        ref = cpu_tiled.run_blocks(layer.blocks, x)
        assert torch.equal(x, x0) and ref.data_ptr() != x.data_ptr()  # by default the caller's x is kept
        assert torch.equal(layer(x, return_before_merge=True)[1], ref) and torch.equal(x, x0)  # called directly: copies
        out = cpu_tiled.run_blocks(layer.blocks, x, consume=True)
        assert out.data_ptr() == x.data_ptr() and torch.equal(out, ref)  # handed over: in place, same values
        assert torch.equal(cpu_tiled.run_blocks(layer.blocks, x0[:, :13, :11], consume=True),
                           cpu_tiled.run_blocks(layer.blocks, x0[:, :13, :11].clone()))  # padded: a new buffer

        image = torch.randn(2, 3, 32, 32)
        logits = model(image)
        kept = []  # a hook that keeps an intermediate: the model then never overwrites one
        handle = model.patch_embed.register_forward_hook(lambda m, i, o: kept.append(o))
        assert not model._owns_stage_inputs(image)
        torch.testing.assert_close(model(image), logits, rtol=0, atol=0)
        handle.remove()
        torch.testing.assert_close(kept[0], model.patch_embed(image), rtol=0, atol=0)  # kept intact
        assert model._owns_stage_inputs(image)
        assert not model._owns_stage_inputs(image.to("meta"))  # only the CPU path runs in place


def test_cpu_tiled_only_where_it_is_the_same_function():
    from swin.ops import cpu_tiled

    model = swin.create_model("swin_micro").eval()
    layer, x = model.layers[0], torch.randn(1, 16, 16, 48)
    with torch.no_grad():
        assert cpu_tiled.eligible(layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_tiled.eligible(layer, x)
        model.train()
        assert not cpu_tiled.eligible(layer, x)  # dropout / drop path are live in training mode
        model.eval().set_backend("reference")
        assert not cpu_tiled.eligible(layer, x)
    model.set_backend("sdpa")
    assert not cpu_tiled.eligible(layer, x)  # autograd on: the per-block path saves what backward needs
    model.requires_grad_(False)  # a frozen backbone: nothing to differentiate, grad mode or not
    assert cpu_tiled.eligible(layer, x)
    assert not cpu_tiled.eligible(layer, x.clone().requires_grad_(True))


def test_stage_key_is_marked_as_the_public_decorator_marks_and_import_stays_light():
    """cpu_tiled marks its stage key by hand, as @torch.compiler.assume_constant_result would (the
    decorator imports torch._dynamo, ~1.8 s of every `import swin`): the marks must stay the same."""
    from swin.ops import cpu_tiled

    def probe(blocks):
        return 0

    torch.compiler.assume_constant_result(probe)
    marks = {k: v for k, v in vars(probe).items() if not k.startswith("__")}
    assert marks and all(getattr(cpu_tiled._stage_key, k, object()) == v for k, v in marks.items())
    code = "import sys, swin; m = swin.create_model('swin_micro'); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(not TORCH_2_11, reason="the compiled stage op needs torch >= 2.11")
@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_cpu_tiled_is_one_op_per_stage_inside_torch_compile_and_never_exported(name, monkeypatch):
    """Compiled for CPU inference, each stage is one swin::cpu_stage call (the chunked path runs
    untraced) and a compiled deep copy computes with its own weights; a training graph and an
    exported program hold no such op (torch.export must give standard operators only), and
    torch.jit.trace records the per-block path (it failed on the chunked one)."""
    from swin.ops import cpu_tiled

    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    model = _random_model(name)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.head.bias.add_(1.0)
        copied.layers[0].blocks[0].mlp.fc2.weight.mul_(2.0)
    x = torch.randn(2, 3, 38, 54)  # padded maps
    with torch.no_grad():
        for m in (model, copied):
            torch._dynamo.reset()
            out = torch.compile(m, backend=record, fullgraph=True)(x)
            assert graphs[-1].count("swin.cpu_stage") == len(m.layers)
            with monkeypatch.context() as mp:  # eager merges patches with a C kernel; compiled, inductor does
                mp.setattr(cpu_tiled, "merge_eligible", lambda *a: False)
                assert rel_err(out, m(x)) <= 1e-6
        assert rel_err(copied(x), model(x)) > 1e-3  # the two really differ
    torch._dynamo.reset()
    model.train()
    torch.compile(model, backend=record, fullgraph=True)(x).sum().backward()
    assert "swin.cpu_stage" not in graphs[-1]
    model.eval()
    program = torch.export.export(model, (x,))
    assert "swin" not in str(program.graph)
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) <= 1e-5
        traced = torch.jit.trace(model, x, check_trace=False)
        assert rel_err(traced(x), model(x)) <= 1e-5


def test_fast_paths_step_aside_for_forward_hooks():
    """A hook on a block or on an MLP layer still fires (the fast paths would skip those calls)."""
    model = swin.create_model("swin_micro", drop_path_rate=0.0, drop_rate=0.0)
    seen = []
    model.layers[0].blocks[1].register_forward_hook(lambda m, i, o: seen.append("block"))
    model.layers[1].blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append("fc1"))
    model.layers[2].blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append("qkv"))
    x = torch.randn(1, 3, 32, 32)
    for backend in ("auto", "sdpa", "reference"):
        seen.clear()
        model.set_backend(backend)
        with torch.inference_mode():
            model.eval()(x)
        assert seen == ["block", "fc1", "qkv"], backend
        model.train()(x).sum().backward()  # training: the MLP with the hook takes the plain path
        assert seen == ["block", "fc1", "qkv"] * 2, backend


class _LoRA(torch.nn.Module):
    """A LoRA layer as peft and loralib build one: the base nn.Linear (whose weight and bias it
    exposes, as they do) plus a trainable low-rank product."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.2)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.2)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()

    def merged(self) -> torch.nn.Linear:
        lin = copy.deepcopy(self.base)
        with torch.no_grad():
            lin.weight.add_(self.B @ self.A)
        return lin


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_replaced_linears_are_called_on_every_path(name):
    """qkv/proj/fc1/fc2 replaced by LoRA layers: every backend, in inference (the CPU chunked path)
    and training (the recompute MLP), computes what the model with the merged weights computes,
    and the LoRA parameters get gradients. (The fast paths used to read `.weight` and skip them.)"""
    torch.manual_seed(0)
    model = swin.create_model(name, drop_path_rate=0.0)
    wrapped = copy.deepcopy(model)
    for blk in (b for layer in wrapped.layers for b in layer.blocks):
        blk.attn.qkv, blk.attn.proj = _LoRA(blk.attn.qkv), _LoRA(blk.attn.proj)
        blk.mlp.fc1, blk.mlp.fc2 = _LoRA(blk.mlp.fc1), _LoRA(blk.mlp.fc2)
    merged = copy.deepcopy(wrapped)
    for blk in (b for layer in merged.layers for b in layer.blocks):
        blk.attn.qkv, blk.attn.proj = blk.attn.qkv.merged(), blk.attn.proj.merged()
        blk.mlp.fc1, blk.mlp.fc2 = blk.mlp.fc1.merged(), blk.mlp.fc2.merged()
    x = torch.randn(2, 3, 40, 36)  # padded maps too
    with torch.inference_mode():
        base = model.eval()(x)
    for backend in ("reference", "sdpa", "auto"):
        wrapped.set_backend(backend)
        merged.set_backend(backend)
        with torch.inference_mode():
            out, ref = wrapped.eval()(x), merged.eval()(x)
        assert rel_err(out, ref) <= 1e-5, backend
        assert rel_err(out, base) > 1e-2, backend  # the LoRA layers did change the output
        wrapped.zero_grad()
        out = wrapped.train()(x)
        assert rel_err(out, merged.train()(x)) <= 1e-5, backend
        out.square().mean().backward()
        lora_grads = [p.grad for n, p in wrapped.named_parameters() if n.endswith((".A", ".B"))]
        assert len(lora_grads) == 4 * sum(len(layer.blocks) for layer in wrapped.layers) * 2
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_grads), backend


def test_dynamic_int8_quantization_runs_on_every_path():
    """torch.ao's dynamic int8 quantization replaces every nn.Linear; the model runs with it (it
    used to fail: the fast paths read `.weight`, a method on a quantized layer) and stays close."""
    quantize_dynamic = getattr(getattr(torch, "ao", None) and torch.ao.quantization, "quantize_dynamic", None)
    if quantize_dynamic is None:
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    torch.manual_seed(0)
    model = swin.create_model("swin_micro").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao, still present
        qmodel = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    for backend in ("reference", "sdpa", "auto"):
        qmodel.set_backend(backend)
        with torch.inference_mode():
            out = qmodel(x)
        assert rel_err(out, ref) <= 0.05, (backend, rel_err(out, ref))


# -- training MLP with GELU recomputed in backward (swin.ops.mlp) -------------------------------
def _saved_bytes(fn) -> int:
    """Bytes of distinct tensor storages autograd saves while running fn() (parameters excluded)."""
    seen: dict = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [7, 4096])  # CPU: several chunks with a partial last one / one chunk
@pytest.mark.parametrize("onednn", [True, False])  # CPU fp32: products through oneDNN, or addmm / mm
def test_recompute_gelu_mlp_equals_plain_mlp(onednn, chunk, device, monkeypatch):
    from swin.model import Mlp
    from swin.ops import mlp as mlp_ops, onednn as onednn_ops

    if onednn and (device != "cpu" or not onednn_ops.available(torch.float32)):
        pytest.skip("oneDNN products: CPU with PyTorch's oneDNN build")
    monkeypatch.setattr(mlp_ops, "CPU_CHUNK_TOKENS", chunk)
    monkeypatch.setattr(onednn_ops, "USE_TRAINING", onednn)
    used = []
    mm_t = onednn_ops.mm_t
    monkeypatch.setattr(onednn_ops, "mm_t", lambda *a: used.append(1) or mm_t(*a))
    torch.manual_seed(0)
    plain = Mlp(24, 96, backend="reference").to(device)
    fast = copy.deepcopy(plain)
    fast.backend = "auto"
    x = torch.randn(2, 5, 6, 24, device=device)
    results = []
    for m in (plain, fast):
        xi = x.clone().requires_grad_(True)
        nbytes, out = _saved_bytes(lambda: m(xi))
        (out * torch.linspace(-1, 1, 24, device=device)).sum().backward()
        results.append((nbytes, out, xi.grad, [p.grad for p in m.parameters()]))
    (b_plain, o_p, gx_p, gp_p), (b_fast, o_f, gx_f, gp_f) = results
    assert rel_err(o_f, o_p) <= 1e-6 and rel_err(gx_f, gx_p) <= 1e-5
    for a, b in zip(gp_f, gp_p):
        assert rel_err(a, b) <= 1e-5
    hidden = 2 * 5 * 6 * 96 * 4
    assert b_plain - b_fast >= hidden  # GELU's output (tokens x 4C) is no longer kept
    assert bool(used) == onednn


@pytest.mark.parametrize("bias,frozen", [(True, False), (False, False), (True, True)])
def test_onednn_linear_equals_f_linear_forward_and_backward(bias, frozen):
    """fp32 CPU training products through oneDNN (forward and input gradient) and mm (weight
    gradient): F.linear's values and gradients to float rounding; outside autograd, F.linear itself."""
    from swin.ops import onednn

    if not onednn.available(torch.float32):
        pytest.skip("PyTorch built without oneDNN's linear ops")
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80, bias=bias)
    lin.weight.requires_grad_(not frozen)
    x = torch.randn(3, 37, 48)
    g = torch.randn(3, 37, 80)
    results = []
    for fn in (F.linear, onednn.linear):
        xi = x.clone().requires_grad_(True)
        lin.zero_grad(set_to_none=True)
        out = fn(xi, lin.weight, lin.bias)
        assert out.shape == (3, 37, 80)
        out.backward(g)
        results.append((out, xi.grad, lin.weight.grad, None if lin.bias is None else lin.bias.grad))
    assert onednn.training_eligible(x, lin.weight)
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(b, a) <= 1e-5
    assert frozen == (results[1][2] is None)
    with torch.no_grad():
        assert not onednn.training_eligible(x, lin.weight)
        assert torch.equal(onednn.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))


def test_recompute_gelu_mlp_frozen_weights_and_autocast():
    from swin.model import Mlp

    torch.manual_seed(0)
    plain = Mlp(16, 64, backend="reference")
    fast = copy.deepcopy(plain)
    fast.backend = "sdpa"
    for p in list(plain.fc1.parameters()) + list(fast.fc1.parameters()):
        p.requires_grad_(False)
    x = torch.randn(40, 16)
    outs = []
    for m in (plain, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xi)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        outs.append((out.float(), xi.grad, m.fc2.weight.grad))
        assert m.fc1.weight.grad is None
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 2e-2


def test_unit_rows_equals_f_normalize_forward_and_backward():
    from swin.ops.sdpa import unit_rows

    torch.manual_seed(0)
    x = torch.randn(4, 5, 7, 3, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0  # a zero row: the norm is clamped there
    x = x.transpose(2, 3).requires_grad_(True)  # strided, as q and k are
    g = torch.randn(x.shape, dtype=torch.float64)
    ref = torch.nn.functional.normalize(x, dim=-1)
    out = unit_rows(x)
    assert (out - ref).abs().max() == 0
    (gr,) = torch.autograd.grad(ref, x, g)
    (go,) = torch.autograd.grad(out, x, g)
    assert (go - gr).abs().max() <= 1e-12


@pytest.mark.parametrize("d,scaled", [(32, True), (32, False), (24, True), (40, False)])
def test_cpu_unit_rows_kernel_equals_f_normalize(d, scaled, monkeypatch):
    """fp32 training (V2's q and k): the one-pass C kernel's F.normalize (times a factor per head, as
    q's exp(logit_scale)) and its gradients against fp64, on a strided view (as q and k are) with a
    zero row, as close as PyTorch's own fp32 ops."""
    ck = _cpu_kernel()
    from swin.ops import sdpa

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 9, 2, 3, 4, d, generator=g) * 3
    base[0, 0, 1, 0, 0] = 0.0  # a zero row (of the slice used below): the norm is clamped there
    grad = torch.randn(3, 9, 3, 4, d, generator=g).transpose(2, 3)  # strided, as the attention's gradient comes
    factor = torch.rand(4, generator=g) * 20 + 1  # (heads,), along dim -3
    outs, ran = {}, []
    for name, dtype, kernel in (("ours", torch.float32, True), ("torch", torch.float32, False), ("ref", torch.float64, False)):
        monkeypatch.setattr(ck, "unit_rows_eligible", lambda t, k=kernel, f=ck.unit_rows_eligible: k and f(t))
        monkeypatch.setattr(ck, "unit_rows", lambda *a, f=ck.unit_rows: ran.append(name) or f(*a))
        x = base.to(dtype)[:, :, 1].transpose(2, 3).requires_grad_(True)  # (3, 9, 4, 3, d): strided
        assert not x.is_contiguous() and x.stride(-1) == 1
        s = factor.to(dtype).requires_grad_(True)
        y = sdpa.unit_rows(x, s if scaled else None)
        grads = torch.autograd.grad(y, (x, s) if scaled else (x,), grad.to(dtype))
        outs[name] = [t.double() for t in (y, *grads)]
    monkeypatch.undo()
    assert ran == ["ours"]  # the kernel ran for ours only
    clamped = torch.zeros(3, 9, 4, 3, 1, dtype=torch.bool)
    clamped[0, 0, 0, 0] = True  # its input gradient is g / 1e-12: compared relatively, the rest absolutely
    for i in range(len(outs["ref"])):
        mask = clamped if i == 1 else torch.zeros((), dtype=torch.bool)
        err = (outs["ours"][i] - outs["ref"][i]).masked_fill(mask, 0).abs().max().item()
        err_torch = (outs["torch"][i] - outs["ref"][i]).masked_fill(mask, 0).abs().max().item()
        assert err <= max(2 * err_torch, 1e-6 * outs["ref"][i].abs().max().item()), (i, err, err_torch)
    row, ref_row = outs["ours"][1][0, 0, 0, 0], outs["ref"][1][0, 0, 0, 0]
    assert ((row - ref_row).abs().max() / ref_row.abs().max()).item() <= 1e-6 and ref_row.abs().max() > 1e11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v2_inference_normalisation_of_q_and_k_together(dtype, monkeypatch):
    """Inference (no grad): V2's q and k normalised by one norm and one multiply with exp(logit_scale)
    folded into q's factor equal F.normalize(q) * scale and F.normalize(k), zero rows included
    (SwinV2-T inference on this CPU: 1.02-1.025x, two A/B runs of 7 and 12 rounds)."""
    from swin.ops import sdpa

    torch.manual_seed(0)
    attn = make_attn(2, dim=48, heads=3, window=4, seed=1)
    with torch.no_grad():
        attn.logit_scale.add_(torch.randn_like(attn.logit_scale))
    qkv = torch.randn(2, 5, 16, 3, 3, 16).to(dtype)  # (B, nW, N, 3, heads, d)
    qkv[0, 0, 0, :2] = 0.0  # padded tokens of V2 have q = k = 0 (no k bias): the clamp must hold
    with torch.no_grad():
        fused = sdpa.split_qkv(attn, qkv)
        monkeypatch.setattr(sdpa, "FUSED_NORMALIZE", False)
        plain = sdpa.split_qkv(attn, qkv)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(fused[:3], plain[:3]):
        assert a.dtype == dtype and torch.isfinite(a).all() and rel_err(a, b) <= tol
    assert fused[3] == plain[3] == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_eval_caches_follow_fused_optimizer_steps(name, device):
    """AdamW(fused=True) writes the weights without bumping their version counters: an evaluation after
    a step must still see the new weights (eval bias caches, CPU-prepacked fc1 weights)."""
    from swin.ops import invalidate_caches

    model = _random_model(name).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with torch.inference_mode():
        before = model(x)  # fills the caches
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():  # a write PyTorch does not record either: needs invalidate_caches()
        model.layers[0].blocks[0].mlp.fc1.weight.data.mul_(1.5)
    invalidate_caches()
    with torch.inference_mode():
        fast = model(x)
        model.set_backend("reference")
        ref = model(x)
    assert rel_err(fast, before) > 1e-3  # the weights did change
    assert rel_err(fast, ref) <= 1e-5


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_training_step_grads_equal_reference(monkeypatch, name):
    """Every gradient of a training step on the SDPA path (on AVX-512 CPUs the C attention kernels,
    forward and backward) equals the plain reference path's."""
    from swin.ops import cpu_kernels as ca

    calls = []
    kernel = ca.window_attention_backward
    monkeypatch.setattr(ca, "window_attention_backward", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    ref = swin.create_model(name, drop_path_rate=0.0, backend="reference").train()
    fast = copy.deepcopy(ref)
    fast.set_backend("sdpa")
    x = torch.randn(3, 3, 30, 26)  # padded, non-square maps
    for m in (ref, fast):
        m(x).square().mean().backward()
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        assert rel_err(pf.grad, pr.grad) <= 1e-4, n
    assert len(calls) == (sum(fast.config.depths) if ca.available() else 0)


def test_sdpa_bias_cache_follows_weight_updates():
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend="sdpa").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for blk in model.layers[0].blocks:
            blk.attn.relative_position_bias_table.add_(torch.randn_like(blk.attn.relative_position_bias_table))  # in place: the cached bias must follow
        after = model(x)
        model.set_backend("reference")
        ref = model(x)
    assert (after - before).abs().max() > 1e-3
    assert rel_err(after, ref) <= 1e-5


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_training_after_inference_mode_uses_cached_tensors_safely(name):
    """Caches filled under inference_mode must not hold inference tensors that autograd later saves."""
    model = swin.create_model(name, backend="sdpa").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)
    for p in model.parameters():  # frozen bias: the eval cache is used while training
        p.requires_grad_(False)
    model.patch_embed.proj.weight.requires_grad_(True)
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Unknown attention backend"):
        check_backend("flash9")
    with pytest.raises(ValueError):
        swin.create_model("swin_micro").set_backend("nope")


def test_auto_resolves_to_sdpa_on_cpu():
    x = torch.randn(1, 8, 8, 16)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert resolve_backend("auto", x, 4) == "sdpa"
        assert resolve_backend("triton", x, 4) == "sdpa"  # falls back cleanly without CUDA
    assert resolve_backend("sdpa", x, 4) == "sdpa"


@pytest.mark.parametrize("backend", ["sdpa"])  # the default ("auto") is compiled in tests/test_model.py
def test_compile_fullgraph_cpu(backend):
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend=backend).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    assert rel_err(out, ref) <= 1e-4


def test_compile_for_inference_cpu_falls_back_to_eager():
    from swin.ops import CudaGraphRunner, compile_for_inference

    model = swin.create_model("swin_micro")
    x = torch.randn(1, 3, 32, 32)
    assert compile_for_inference(model, x, mode="cuda-graph") is model  # no CUDA graph on CPU
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(model, x)
    with pytest.raises(ValueError, match="Unknown mode"):
        compile_for_inference(model, x, mode="turbo")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "auto", "fused"])
def test_cuda_graph_runner_matches_eager_cuda(backend):
    from swin.ops import compile_for_inference

    torch.manual_seed(0)
    model = swin.create_model("swin_t", num_classes=10, backend=backend).cuda().eval()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x).clone()
    runner = compile_for_inference(model, x, mode="cuda-graph")
    x2 = torch.randn_like(x)
    with torch.no_grad():
        ref2 = model(x2)
    out2 = runner(x2).clone()  # fresh input through the captured graph
    out = runner(x).clone()
    assert rel_err(out, ref) <= 1e-4 and rel_err(out2, ref2) <= 1e-4


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("name,size", [("swin_t", 224), ("swinv2_t_w8", 120)])
def test_fused_whole_model_logits_cuda(name, size):
    """backend "fused" on a whole model (stage 1 as one kernel per block half, the rest as "triton"):
    fp32 logits equal the reference's; under bf16 autocast within the reference's own bf16 error."""
    torch.manual_seed(0)
    model = swin.create_model(name, num_classes=10, backend="reference").cuda().eval()
    x = torch.randn(2, 3, size, size + 24, device="cuda")  # non-square; V2 at 120: padded maps
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref_lowp = model(x).float()
        model.set_backend("fused")
        out = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_lowp = model(x).float()
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(out_lowp, ref) <= max(1e-2, 2.0 * rel_err(ref_lowp, ref))


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
def test_triton_under_torch_compile_cuda():
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend="triton", drop_path_rate=0.0).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    out = torch.compile(model)(x)
    out.square().mean().backward()
    r = ref(x)
    r.square().mean().backward()
    assert rel_err(out, r) <= 1e-3  # tf32 outside the kernels under inductor
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-2, n


@pytest.mark.skipif(not triton_available(), reason="needs Triton >= 3.6")
def test_triton_launch_configuration_is_timed_once_and_the_fastest_kept(monkeypatch):
    """On CUDA each input signature times every launch configuration once and keeps the fastest;
    later calls reuse it; FORCE_CONFIG (tests) overrides; off CUDA the first runs untimed."""
    from swin.ops import triton_window as T

    monkeypatch.setattr(T, "_CHOSEN", {})
    monkeypatch.setattr(T, "_CONFIGS", {})
    monkeypatch.setattr(T, "FORCE_CONFIG", None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fake_ms = {0: 3.0, 1: 1.0, 2: 2.0}
    timed, ran = [], []
    monkeypatch.setattr(T, "_elapsed_ms", lambda launch, config: timed.append(config) or fake_ms[config])
    configs = (0, 1, 2)
    launch = lambda config: ran.append(config) or config  # noqa: E731
    assert T._choose("fwd", ("sig",), configs, launch, cuda=True) == 1 and timed == [0, 1, 2]
    assert T._choose("fwd", ("sig",), configs, launch, cuda=True) == 1 and timed == [0, 1, 2]  # cached
    assert T._choose("fwd", ("other",), configs, launch, cuda=False) == 0 and len(timed) == 3  # CPU: untimed
    monkeypatch.setenv("SWIN_TRITON_TUNE", "0")  # no timing: the first configuration
    assert T._choose("fwd", ("third",), configs, launch, cuda=True) == 0 and len(timed) == 3
    monkeypatch.setattr(T, "FORCE_CONFIG", 2)
    assert T._choose("fwd", ("sig",), configs, launch, cuda=True) == 2
    assert T.choices() == {("fwd", ("sig",)): configs[1]}
    # varying batch sizes share the timing of their power-of-two bucket (dropped samples, last batches)
    a, b, c = (T._shape_key((n, 56, 56, 288)) for n in (120, 128, 129))
    assert a == b == (128, 56, 56, 288) and c == (256, 56, 56, 288) and T._pow2(1) == 1
    monkeypatch.setattr(T, "FORCE_CONFIG", None)
    monkeypatch.delenv("SWIN_TRITON_TUNE")
    before = len(timed)
    assert T._choose("bwd", (a,), configs, launch, cuda=True) == 1 and len(timed) == before + 3
    assert T._choose("bwd", (b,), configs, launch, cuda=True) == 1 and len(timed) == before + 3
    assert T._choose("bwd", (c,), configs, launch, cuda=True) == 1 and len(timed) == before + 6


def _resources_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_resources", ROOT / "benchmarks" / "triton_resources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not triton_available(), reason="needs Triton >= 3.6")
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """Every launch configuration compiles to an sm_90 cubin with Triton's own ptxas, no GPU needed
    (the interpreter accepts code that the compiler refuses, as a module global once did), and the
    forward at its default launch keeps to <= 128 registers per thread without spilling (stop 9:
    from 166 to 120, 4 programs per SM instead of 3). Compiled as the launcher specialises it (aligned
    pointers, strides divisible by 16) the one-window forward loads 128 bits at a time and the walking
    forward and the backward pipeline their loads (asynchronous copies): without that specialisation
    neither happens, and the registers counted were those of another kernel."""
    from swin.ops import triton_window as T

    tool = _resources_tool()
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:  # pragma: no cover - a Triton without the NVIDIA backend
        pytest.skip("this Triton has no NVIDIA backend")
    default = tool.compile_kernel("fwd", T.FWD_CONFIGS[0], 90, "bf16", cosine=False, mask=True)
    assert default["regs"] <= 128 and default["spill_bytes"] == 0, default
    inference = tool.compile_kernel("fwd", T.FWD_CONFIGS[0], 90, "bf16", cosine=False, mask=True, store_lse=False)
    assert inference["regs"] <= default["regs"] and inference["spill_bytes"] == 0, inference
    assert default["vector_loads"] > 0 and default["async_copies"] == 0, default
    walking = next(c for c in T.FWD_CONFIGS if "programs" in c)
    for store_lse in (False, True):
        r = tool.compile_kernel("fwd", walking, 90, "bf16", cosine=False, mask=True, store_lse=store_lse)
        assert r["async_copies"] >= 6 and r["regs"] <= 128 and r["spill_bytes"] == 0, (walking, r)
    assert tool.compile_kernel("bwd", T.BWD_CONFIGS[0], 90, "bf16", cosine=False, mask=True)["async_copies"] > 0
    for kernel, configs in (("fwd", T.FWD_CONFIGS), ("bwd", T.BWD_CONFIGS)):
        for config in {tuple(sorted(c.items())) for c in configs}:
            r = tool.compile_kernel(kernel, dict(config), 90, "bf16", cosine=True, mask=True)
            assert 0 < r["regs"] <= 255 and r["shared"] > 0, (kernel, config, r)
    assert tool.compile_kernel("fwd", T.FWD_CONFIGS[0], 90, "fp32", cosine=False, mask=False)["regs"] > 0
    from swin.ops import triton_block as TB  # backend "fused": fits an SM, and its first launch does not spill

    for kind, configs in (("block", TB.BLOCK_CONFIGS), ("mlp", TB.MLP_CONFIGS)):
        for config in configs:
            for heads, cosine in ((3, False), (4, True)):
                r = tool.compile_kernel(kind, config, 90, "bf16", cosine=cosine, mask=True, heads=heads)
                assert r["shared"] <= 227 * 1024 and (config != configs[0] or r["spill_bytes"] == 0), (kind, r)


@pytest.mark.skipif(not triton_available(), reason="needs Triton >= 3.6")
def test_fused_probe_resumes_after_a_process_that_dies(tmp_path):
    """benchmarks/fused_probe.py (for a GPU) dry-run in the interpreter: a launch whose process dies
    (as an illegal memory access ends it) is named in the table and the cases after it still run."""
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_PROBE_DEVICE="cpu", FUSED_PROBE_FAIL_AT="0:1",
               PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_probe.py"), "--out", str(tmp_path),
                           "--groups", "0", "--configs", "1", "--no-model", "--timeout", "300"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "fused_probe.json").read_text())["rows"]
    # group 0: fp32 input under autocast, 56 x 56; one configuration: attention and MLP, unshifted and shifted
    assert [r["status"] for r in rows] == ["ok", "CRASH", "ok", "ok"], rows
    assert rows[1]["kernel"] == "attention" and rows[1]["shift"] == 3
    assert all(r["err"] <= 1e-2 for r in rows if r["status"] == "ok"), rows
    assert "| attention | fp32 | 56x56 | 0 | 3 | CRASH |" in (tmp_path / "fused_probe.md").read_text()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_position_tables_built_under_inference_mode_still_train():
    """A V2 model run under torch.inference_mode (validation) builds the shared position tables; a
    training step of another V2 model must be able to save them for backward."""
    for f in (W._cached_log_coords, W._cached_shift_mask, W._cached_relative_offsets):
        f.cache_clear()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        swin.create_model("swinv2_micro", backend="reference").eval()(x)
    for backend in ("reference", "auto"):
        swin.create_model("swinv2_micro", backend=backend).train()(x).sum().backward()


@pytest.mark.parametrize("name", ["swin_micro", "swinv2_micro"])
def test_strided_weights_and_biases_give_the_reference_logits(name):
    """Parameters that are views with strides (made by slicing, or put in by load_state_dict(assign=True)):
    the oneDNN products read a bias as contiguous memory, so the fast path copies them first."""
    torch.manual_seed(0)
    model = swin.create_model(name, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight = torch.nn.Parameter(torch.randn(*mod.weight.shape, 2)[..., 1] * 0.05)
                if mod.bias is not None:
                    mod.bias = torch.nn.Parameter(torch.randn(mod.bias.shape[0], 3)[:, 2])
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 1e-5


def test_backward_hooks_fire_on_every_backend():
    """Grad-CAM / K-FAC style backward hooks on qkv, proj, fc1, fc2: the fast paths step aside for them
    (in training), and qkv is called as a module on the reference path too."""
    for backend in ("auto", "reference"):
        model = swin.create_model("swin_micro", drop_path_rate=0.0, backend=backend).train()
        blk, calls = model.layers[0].blocks[0], []
        for mod in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            mod.register_full_backward_hook(lambda m, gi, go, calls=calls: calls.append(m))
        blk.mlp.fc2.register_full_backward_pre_hook(lambda m, go, calls=calls: calls.append("pre"))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert len(calls) == 5 and {id(c) for c in calls if c != "pre"} == {id(m) for m in (
            blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)}, (backend, calls)
        with torch.no_grad():  # nothing to differentiate: the hooks cannot fire, the fast paths run
            model.eval()(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_per_sample_gradients_with_vmap(backend):
    """torch.func's per-sample-gradient recipe (vmap over grad) equals a loop of single-image gradients."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = swin.create_model("swin_micro", drop_path_rate=0.0, backend=backend).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        one = grad(loss)(params, x[i], y[i])
        for k in ("layers.0.blocks.1.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
            assert _rel(per_sample[k][i], one[k]) < 1e-5, k


def test_a_submodules_dtype_round_trip_is_seen_by_the_weight_caches():
    """fc1.bfloat16(); fc1.float() keeps the Parameter objects and their versions (param.data is set);
    the caches hold the old storage, so the new one cannot take its address and pass for it."""
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    fc1 = model.layers[0].blocks[0].mlp.fc1
    for _ in range(6):
        with torch.no_grad():
            model(x)  # the caches of this weight are built
        fc1.bfloat16()
        fc1.float()  # new values (rounded to bf16), same Parameter, same version
        ref = copy.deepcopy(model)
        ref.set_backend("reference")
        with torch.no_grad():
            assert _rel(model(x), ref(x)) < 1e-5


def test_kernel_cache_without_a_home_and_with_a_damaged_library(tmp_path, monkeypatch):
    """No $HOME and no passwd entry: the kernels are built in a folder of the temporary directory. A
    library cut short (a half-copied cache, which would kill the process with SIGBUS when loaded) is
    built again."""
    import shutil
    from pathlib import Path as P

    from swin.ops import cpu_kernels as K

    monkeypatch.delenv("SWIN_CACHE_DIR", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(P, "home", staticmethod(no_home))
    assert K._cache_dir().parent == P(K.tempfile.gettempdir())
    if not K.available():
        pytest.skip("the C kernels are not built here")
    good = P(K._lib._name)
    monkeypatch.setenv("SWIN_CACHE_DIR", str(tmp_path))
    built = []
    monkeypatch.setattr(K, "compile_source", lambda source, so: (built.append(so), shutil.copy(good, so)))
    path = tmp_path / good.name
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert not K.intact(path)
    assert K._build() is not None and len(built) == 1 and K.intact(path)
    assert K._build() is not None and len(built) == 1  # whole now: loaded as it is


def test_weight_caches_keep_within_their_budget_over_many_image_sizes(monkeypatch):
    """A detection loop over many image sizes: each attention module keeps its most recently used bias +
    mask tensors within CACHE_BYTES (a review measured 1.6 GB of them for Swin-T over 40 COCO-like sizes),
    and what it evicts and builds again is still right."""
    from swin import ops

    monkeypatch.setattr(ops, "CACHE_BYTES", 200_000)
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", backend="sdpa").eval()
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    sizes = [(32 + 8 * i, 48 + 4 * i) for i in range(8)]
    with torch.inference_mode():
        for h, w in sizes + sizes[:2]:  # the first two again, after their eviction
            x = torch.randn(1, 3, h, w)
            assert _rel(model(x), ref(x)) < 1e-5, (h, w)
            for m in model.modules():
                entries = list(ops._CACHES.get(m, {}).values())
                assert len(entries) <= 1 or sum(e[4] for e in entries) <= ops.CACHE_BYTES
    attn = model.layers[0].blocks[1].attn
    assert len(ops._CACHES[attn]) < len(sizes)  # some were evicted


def test_batched_gradients_through_the_fast_paths_say_what_works():
    """torch.autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) hand the backwards legacy
    batched tensors without storage: a clear error naming what does work, not a crash deep in a kernel."""
    torch.manual_seed(0)
    model = swin.create_model("swin_micro", drop_path_rate=0.0, num_classes=10)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = model(x)
    with pytest.raises(RuntimeError, match="Batched gradients .* torch.func.jacrev"):
        torch.autograd.grad(out, x, torch.eye(10).view(10, 1, 10), is_grads_batched=True)
    model.set_backend("reference")
    out = model(x)
    (g,) = torch.autograd.grad(out, x, torch.eye(10).view(10, 1, 10), is_grads_batched=True)
    assert g.shape == (10, 1, 3, 32, 32)


def test_an_older_triton_is_left_unused_with_one_warning(monkeypatch):
    """Triton older than swin.ops.TRITON_MIN (torch 2.7's 3.3 spills registers and its interpreter fails
    the backward): "auto" runs SDPA with one warning naming the versions, "triton" is refused."""
    import triton

    import swin.ops as O

    assert O._triton_version("3.3.1") == (3, 3) and O._triton_version("3.6.0+git1234") == (3, 6)
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    monkeypatch.setattr(O, "_TRITON", None)
    with pytest.warns(RuntimeWarning, match=r"Triton >= 3\.6.*found 3\.3\.1.*SDPA"):
        assert not O.triton_available()
    assert O.resolve_backend("auto", torch.zeros(1), 7) == "sdpa"
    with pytest.raises(ValueError, match=r"version >= 3\.6"):
        O.check_backend("triton")
    monkeypatch.setattr(O, "_TRITON", None)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert O.triton_available()
