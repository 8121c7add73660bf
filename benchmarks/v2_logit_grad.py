"""How far logit_scale's gradient is from fp32 in bf16, per V2 attention path, over many seeds.

PYTHONPATH=src:. python3 benchmarks/v2_logit_grad.py   (CUDA if present; also runs on CPU)
Variants of the SDPA path's fold of exp(logit_scale) into q: in bf16 (as before stop 9) or in fp32.
"""
import copy
import math
import statistics
import sys

import torch
import torch.nn.functional as F

import swin.ops.sdpa as S
from swin import windows as W
from tests.test_ops import CASES, make_attn, rel_err

dev = "cuda" if torch.cuda.is_available() else "cpu"


def fold(dtype_fold):
    def split_qkv(attn, qkv):
        q, k, v = qkv.unbind(-3)
        if attn.version == 1:
            return q, k, v, attn.scale
        logit = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp().view(attn.num_heads, 1)
        if dtype_fold == "fp32":
            q, k, logit = q.float(), k.float(), logit.float()
        return (F.normalize(q, dim=-1) * logit).to(v.dtype), F.normalize(k, dim=-1).to(v.dtype), v, 1.0
    return split_qkv


variants = {"reference-bf16": ("reference", None), "sdpa-bf16fold": ("sdpa", "bf16"), "sdpa-fp32fold": ("sdpa", "fp32")}
if dev == "cuda":
    variants["triton"] = ("triton", None)
errs = {n: [] for n in variants}
orig = S.split_qkv
for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
    for case in CASES[:4]:
        H, Wd, window, shift = case
        attn = make_attn(2, 24, 3, window, seed=1000 * seed + H * 10 + Wd, device=dev).to(torch.bfloat16)
        torch.manual_seed(seed)
        x = torch.randn(2, H, Wd, 24, device=dev).to(torch.bfloat16)
        win, sh = W.window_and_shift(H, Wd, window, shift)
        grad = None
        ref = None
        for name, (backend, fd) in [("fp32", ("reference", None))] + list(variants.items()):
            S.split_qkv = fold(fd) if fd else orig
            a = copy.deepcopy(attn).to(torch.float32 if name == "fp32" else torch.bfloat16)
            a.backend = backend
            xi = x.to(a.logit_scale.dtype).clone().requires_grad_(True)
            out = a(xi, win, sh, False)
            if grad is None:
                grad = torch.randn(out.shape, device=dev)
            out.backward(grad.to(out.dtype))
            g = a.logit_scale.grad
            if name == "fp32":
                ref = g
            else:
                errs[name].append(rel_err(g, ref))
S.split_qkv = orig
print(f"device {dev}: logit_scale grad rel. error vs fp32, {len(errs['sdpa-bf16fold'])} draws")
for n, e in errs.items():
    print(f"  {n:16s} median {statistics.median(e):.4f}  mean {statistics.mean(e):.4f}  max {max(e):.4f}")
