"""Run by tests/test_ops.py with TRITON_INTERPRET=1: the Triton kernels on the CPU vs the reference.

Prints one JSON line: {"cases": n, "max_rel_err": e, "worst": [...]}. Small sizes only (the
interpreter runs each program in numpy).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from test_ops import make_attn, rel_err  # noqa: E402
from swin import windows as W  # noqa: E402
import copy  # noqa: E402

CASES = [  # version, H, W, window, shift, mask_padding
    (1, 8, 8, 4, 0, False), (1, 8, 8, 4, 2, False), (1, 12, 8, 4, 2, False), (1, 10, 7, 4, 2, False),
    (1, 10, 7, 4, 2, True), (1, 5, 6, 3, 1, True), (1, 4, 9, 7, 3, False), (2, 8, 8, 4, 2, False),
    (2, 10, 7, 4, 2, True), (2, 6, 6, 3, 0, False),
]


def main() -> int:
    from swin.ops import resolve_backend

    assert resolve_backend("triton", torch.zeros(1, 8, 8, 16), 4) == "triton", "interpreter not active"
    worst, results = 0.0, []
    for version, H, Wd, window, shift, mask_padding in CASES:
        attn = make_attn(version, dim=32 if version == 1 else 48, heads=2 if version == 1 else 3, window=window,
                         seed=H * 7 + Wd + shift)
        torch.manual_seed(H * 13 + Wd)
        x = torch.randn(2, H, Wd, attn.dim)
        win, sh = W.window_and_shift(H, Wd, window, shift)
        outs = {}
        g = None
        for name in ("reference", "triton"):
            a = copy.deepcopy(attn)
            a.backend = name
            xi = x.clone().requires_grad_(True)
            out = a(xi, win, sh, mask_padding)
            g = torch.randn_like(out) if g is None else g
            out.backward(g)
            outs[name] = [out, xi.grad] + [p.grad for p in a.parameters()]
        errs = [rel_err(f, r) for f, r in zip(outs["triton"], outs["reference"])]
        results.append({"case": [version, H, Wd, window, shift, mask_padding], "errs": [round(e, 9) for e in errs]})
        worst = max(worst, *errs)
    print(json.dumps({"cases": len(CASES), "max_rel_err": worst, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
