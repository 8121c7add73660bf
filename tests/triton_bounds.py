"""A bounds check for Triton's interpreter (TRITON_INTERPRET=1): every load and store a kernel makes
with its mask on must fall inside the storage of one of the tensors passed to that launch.

On the GPU an access past a tensor is "an illegal memory access", which ends the CUDA context (and
the user's process with it), or worse, reads a neighbour's memory silently. The interpreter on the
CPU dereferences the raw addresses without checking; this wraps its load/store so that a wrong
index or mask is an exception naming the kernel, found with no GPU lent.

    import triton_bounds; triton_bounds.install()   # before the first launch
    ...; triton_bounds.STATS  # {"launches": n, "accesses": n}

It relies on two internals of triton.runtime.interpreter (the builder's masked load/store and the
launcher's argument copy), and raises at install if they are missing, so a Triton upgrade that
moves them fails the check loudly rather than leaving it unchecked.
"""
from __future__ import annotations

import numpy as np

STATS = {"launches": 0, "accesses": 0}
_RANGES: list[tuple[int, int]] = []  # [start, end) byte ranges of the current launch's tensor storages
_KERNEL = ["?"]


class OutOfBounds(RuntimeError):
    pass


def _check(kind: str, ptrs, mask, itemsize: int) -> None:
    addr = np.asarray(ptrs.data).astype(np.uint64)
    if mask is not None:
        addr = addr[np.asarray(mask.data).astype(bool)]
    if addr.size == 0:
        return
    ok = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _RANGES:
        ok |= (addr >= lo) & (addr + itemsize <= hi)
    STATS["accesses"] += int(addr.size)
    if not ok.all():
        bad = addr[~ok]
        raise OutOfBounds(f"{_KERNEL[0]}: {bad.size} masked-in {kind}(s) outside every tensor argument, "
                          f"e.g. address {hex(int(bad[0]))}; argument storages: "
                          f"{[(hex(lo), hi - lo) for lo, hi in _RANGES]}")


def install() -> None:
    """Wrap the interpreter's masked load/store and its per-launch argument copy (idempotent)."""
    from triton.runtime import interpreter as I

    builder = I.InterpreterBuilder
    if getattr(builder, "_swin_bounds", False):
        return
    launchers = [c for c in vars(I).values() if isinstance(c, type) and hasattr(c, "_init_args_hst")]
    if len(launchers) != 1 or not hasattr(builder, "create_masked_load") or not hasattr(I, "_get_np_dtype"):
        raise RuntimeError("triton_bounds: this Triton's interpreter internals moved; update tests/triton_bounds.py")
    launcher = launchers[0]
    init_args, load, store = launcher._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args_checked(self, args_dev, kwargs):
        _RANGES.clear()
        for arg in list(args_dev) + list(kwargs.values()):
            arg = getattr(arg, "base", arg)  # a TMA descriptor: its tensor
            if hasattr(arg, "untyped_storage"):
                s = arg.untyped_storage()
                _RANGES.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        fn = getattr(self, "fn", None)
        _KERNEL[0] = getattr(fn, "__name__", "?")
        STATS["launches"] += 1
        return init_args(self, args_dev, kwargs)

    def load_checked(self, ptrs, mask, other, *rest, **options):  # options: a TMA descriptor's load passes some
        _check("load", ptrs, mask, np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return load(self, ptrs, mask, other, *rest, **options)

    def store_checked(self, ptrs, value, mask, *rest, **options):
        _check("store", ptrs, mask, np.asarray(value.data).dtype.itemsize)
        return store(self, ptrs, value, mask, *rest, **options)

    launcher._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    builder._swin_bounds = True


def self_test() -> bool:
    """True if a load past a tensor is caught (and the same load inside it is not)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, n, off, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + off + i, mask=i < n, other=0.0), mask=i < n)

    x, y = torch.randn(16), torch.empty(16)
    _copy[(1,)](x, y, 16, 0, BLOCK=32)
    try:  # far past x (a neighbour allocation could hold the next element: not a test of the check)
        _copy[(1,)](x, y, 16, 1 << 20, BLOCK=32)
    except Exception as e:  # the interpreter may wrap it
        return "outside every tensor argument" in str(e)
    return False
