"""Pure window functions: the window/shift rule, pad, partition, reverse, shift mask, relative index.

Masks and indices depend only on (map size, window, shift, device); they are built once and reused
(an LRU cache in eager mode; while torch.compile or torch.jit.trace records, they are built by operations
inside the graph, not taken from the cache).
"""
from __future__ import annotations

import math
from functools import lru_cache, wraps

import torch
import torch.nn.functional as F

MASK_VALUE = -100.0  # what the official code adds to a masked logit before softmax


def kept(maxsize: int):
    """``lru_cache`` for tensors built once and used by every later call: built outside inference mode
    (an inference tensor made under one caller's torch.inference_mode could not be saved for backward
    by a later training step) and outside autograd."""
    def wrap(build):
        @lru_cache(maxsize=maxsize)
        @wraps(build)
        def cached(*args):
            with torch.inference_mode(False), torch.no_grad():
                return build(*args)
        return cached
    return wrap


def recording() -> bool:
    """True while torch.compile or torch.jit.trace records a graph: build masks and indices in the graph
    (from the cache they would be constants that differ between the first call and the next)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def window_and_shift(height: int, width: int, window: int, shift: int) -> tuple[int, int]:
    """The official rule: a map not larger than the window is one window of its size, unshifted."""
    if min(height, width) <= window:
        return min(height, width), 0
    return window, shift


def padded_size(height: int, width: int, window: int) -> tuple[int, int]:
    return math.ceil(height / window) * window, math.ceil(width / window) * window


def pad_to_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the right/bottom to a multiple of ``window``."""
    _, H, W, _ = x.shape
    Hp, Wp = padded_size(H, W, window)
    if Hp == H and Wp == W:
        return x
    return F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C); the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): patch merging's gather, each 2x2 neighbourhood's
    tokens side by side in the official order (0,0), (1,0), (0,1), (1,1) = cat(x[0::2,0::2],
    x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]); an odd map zero-padded at the right/bottom first. One
    permuted copy (its backward is one copy too; the four strided slices' is four zero-filled maps)."""
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = H + H % 2, W + W % 2
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)


def _build_shift_mask(height: int, width: int, window: int, shift: int, mask_padding: bool,
                      device: torch.device) -> torch.Tensor | None:
    """Additive mask (nW, N, N) for a (height, width) map padded to a window multiple, or None.

    Tokens get a region label; a pair of tokens in one window with different labels is masked.
    Regions are the official 3x3 slices of the shifted padded map; with ``mask_padding`` every
    padding token also gets a label of its own class so that real tokens never attend to it.
    """
    Hp, Wp = padded_size(height, width, window)
    has_pad = mask_padding and (Hp != height or Wp != width)
    if shift == 0 and not has_pad:
        return None
    label = torch.zeros(Hp, Wp, dtype=torch.float32, device=device)
    if shift > 0:
        cnt = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                label[hs, ws] = cnt
                cnt += 1
    if has_pad:
        # Labels are built on the shifted map: the padded band sits at rows >= height, cols >= width
        # before the shift, i.e. rolled by -shift afterwards.
        pad = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
        pad[height:, :] = True
        pad[:, width:] = True
        pad = torch.roll(pad, shifts=(-shift, -shift), dims=(0, 1))
        label = torch.where(pad, label + 100.0, label)
    windows = window_partition(label.view(1, Hp, Wp, 1), window).squeeze(-1)  # (nW, N)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)  # (nW, N, N)
    return torch.where(diff != 0, MASK_VALUE, 0.0)


@kept(32)  # (nW, N, N) fp32: ~13 MB at a 1333 px stage-1 map; 32 = 8 image sizes' four stages
def _cached_shift_mask(height, width, window, shift, mask_padding, device):
    return _build_shift_mask(height, width, window, shift, mask_padding, device)


def shift_mask(height: int, width: int, window: int, shift: int, mask_padding: bool,
               device: torch.device) -> torch.Tensor | None:
    if recording():
        return _build_shift_mask(height, width, window, shift, mask_padding, device)
    return _cached_shift_mask(height, width, window, shift, mask_padding, torch.device(device))


def _build_relative_index(window: int, device: torch.device) -> torch.Tensor:
    """(2, N, N) relative offsets (dy, dx) between the tokens of a window, each in [-(w-1), w-1]."""
    coords = torch.stack(torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device),
                                        indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return rel  # offsets in [-(window-1), window-1]


@kept(64)
def _cached_relative_offsets(window, device):
    return _build_relative_index(window, device)


def relative_index(window: int, table_window: int, device: torch.device) -> torch.Tensor:
    """(N, N) index into a ((2M-1)^2)-row table, M = ``table_window``: (dy + M - 1) * (2M - 1) + (dx + M - 1).

    ``window`` may be smaller than M (a map smaller than the window): the small window's offsets
    are then looked up around the centre of the big table.
    """
    if recording():
        rel = _build_relative_index(window, device)
    else:
        rel = _cached_relative_offsets(window, torch.device(device))
    span = 2 * table_window - 1
    return (rel[0] + table_window - 1) * span + (rel[1] + table_window - 1)


def _build_log_coords(window: int, pretrained_window: int, device: torch.device) -> torch.Tensor:
    """V2 continuous-position-bias input: ((2M-1)^2, 2) log-spaced relative coordinates."""
    r = torch.arange(-(window - 1), window, dtype=torch.float32, device=device)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # (2M-1, 2M-1, 2)
    denom = (pretrained_window if pretrained_window > 0 else window) - 1
    table = table / max(denom, 1) * 8  # normalise to [-8, 8]
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.view(-1, 2)


@kept(64)
def _cached_log_coords(window, pretrained_window, device):
    return _build_log_coords(window, pretrained_window, device)


def log_coords(window: int, pretrained_window: int, device: torch.device) -> torch.Tensor:
    if recording():
        return _build_log_coords(window, pretrained_window, device)
    return _cached_log_coords(window, pretrained_window, torch.device(device))
