"""Every foreign checkpoint key scheme, in both directions, and the checkpoint loader.

Formats (``src``/``dst`` names; aliases in parentheses):

- ``swin``: this package's own keys = the official names without buffers.
- ``official`` (``microsoft``): microsoft/Swin-Transformer. Read: the buffers (``relative_position_index``,
  ``attn_mask``, ``relative_coords_table``) are dropped. Write: ``relative_position_index`` for every
  block and, for V2, ``relative_coords_table`` are added; ``attn_mask`` depends on the training
  resolution and is added only when ``config`` is given (without it, a strict load into the official
  model reports exactly the ``attn_mask`` keys of the shifted blocks as missing).
- ``timm``: timm >= 0.9 layout: patch merging at the start of the next stage, ``head.fc``; no buffers.
- ``torchvision``: ``features.N.M``, ``mlp.0``/``mlp.3``; V2 keeps one ``attn.qkv.bias`` whose k slice
  torchvision zeroes at run time. Write adds the flattened ``relative_position_index`` (and V2's
  ``relative_coords_table``) exactly as torchvision computes them.
- ``hf`` (``transformers``, ``huggingface``): ``swin.``/``swinv2.`` prefixed keys with q/k/v split. V1
  changed names in transformers 5 (``attention.q_proj``, ``relative_position_bias.*``, ``mlp.fc1``);
  both 4.x and 5.x names are read, and the installed version's layout is written unless
  ``hf_version`` says otherwise (4.x V1 also saves ``relative_position_index``, which is written too).
- ``mmdet`` (``mmseg``, ``mmpretrain``, ``mmcls``): ``backbone.stages.i.blocks.j.attn.w_msa.*``,
  ``ffn.layers.0.0``/``ffn.layers.1``, patch merging weights in ``nn.Unfold`` channel order; V1 merges
  at the end of a stage (mmdet/mmseg/mmpretrain), V2 (mmpretrain) at the start of the next one. The
  final norm is ``backbone.norm{last}``; an mmpretrain classifier's head is ``head.fc``. Write adds the V1
  ``relative_position_index`` (mmpretrain V2 deletes its buffers before loading).
- Detection and segmentation backbones (mmdet/mmseg, the official Swin-Transformer-Object-Detection and
  -Semantic-Segmentation code, whose keys are the official ones under ``backbone.``; HF ``SwinBackbone``)
  norm each stage's output: ``norm0..norm{last}`` (``hidden_states_norms.stage1..``). The last stage's is
  our ``norm``, the others ``out_norms.i`` (a model built with ``out_norms=True``); written back the same
  way ("official" writes ``norm0..norm{last}`` for a backbone with ``out_norms`` and no head; a classifier
  with ``out_norms`` keeps its final norm as ``norm``). A detector's or segmentor's other parts (necks,
  heads, queries: everything beside ``backbone.``, and ``head.`` of an mmpretrain classifier) are dropped
  on read, with a warning; layouts with no place for ``out_norms`` (timm, torchvision, HF V2, and HF V1
  for a model with a head: only a headless V1 backbone maps to ``SwinBackbone``) drop them with a warning.

Window size: V1 windows are read off the bias table; V2 weights do not carry it, so writing V2 into
a format with buffers (``official``, ``torchvision``) needs ``config=`` or ``window_size=``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import windows as W
from .config import SwinConfig

__all__ = ["FORMATS", "convert_state_dict", "detect_format", "load_checkpoint", "read_checkpoint", "save_state_dict",
           "LoadResult"]

FORMATS = ("swin", "official", "timm", "torchvision", "hf", "mmdet")
_ALIASES = {"ours": "swin", "microsoft": "official", "transformers": "hf", "huggingface": "hf",
            "mmseg": "mmdet", "mmpretrain": "mmdet", "mmcls": "mmdet"}

# Buffers any format may have saved; they are rebuilt from the window size, never read.
_BUFFER_LEAVES = ("relative_position_index", "attn_mask", "relative_coords_table")

# Our per-block parameter leaves (official names).
_BLOCK_LEAVES = frozenset({
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "attn.relative_position_bias_table",  # V1
    "attn.q_bias", "attn.v_bias", "attn.logit_scale",  # V2
    "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight",  # V2
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
})
_MERGE_LEAVES = frozenset({"reduction.weight", "norm.weight", "norm.bias"})
_TOP_KEYS = frozenset({"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                       "patch_embed.norm.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"})
_OUT_NORM_RE = re.compile(r"^out_norms\.(\d+)\.(weight|bias)$")  # a backbone's per-stage output norms
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MERGE_RE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")

# Nesting keys of training checkpoints, most preferred first ("model" beats an EMA copy).
_NEST_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net", "network",
              "state_dict_ema", "model_ema", "ema")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")  # stripped only when every key has it


@dataclass(frozen=True)
class _Info:
    fmt: str
    version: int  # 1 or 2
    hf_version: int | None = None  # 4 or 5 for HF V1 names
    detected: str | None = None  # set when the caller named the format: what the keys looked like

    def describe(self) -> str:
        name = "SwinV2" if self.version == 2 else "Swin V1"
        hf = f", transformers {self.hf_version}.x names" if self.hf_version else ""
        if self.detected:
            return f"'{self.fmt}' (as given; the keys look like '{self.detected}', {name})"
        return f"'{self.fmt}' (detected; {name}{hf})"


class LoadResult(NamedTuple):
    """What :func:`load_checkpoint` did not fill (``missing_keys``) or could not use (``unexpected_keys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------
# Unwrapping and detection
# ---------------------------------------------------------------------------------------------
def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a training checkpoint and strip wrapper prefixes (DDP, compile)."""
    for _ in range(5):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise ValueError(f"Expected a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not obj:
            raise ValueError("The checkpoint is empty: it holds no tensors.")
        nested = next((k for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:  # a flat dict with some metadata entries mixed in
                obj = tensors
                break
            raise ValueError(f"No state dict found in the checkpoint: its top-level keys are {_first(map(str, obj))}; "
                             f"expected tensors or one of the nesting keys {', '.join(_NEST_KEYS)}.")
        obj = obj[nested]
    sd = dict(obj)
    if any(k.startswith("encoder.patch_embed.") for k in sd):  # official SimMIM pre-training: encoder + decoder
        dropped = [k for k in sd if not k.startswith("encoder.") or k == "encoder.mask_token"]
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k not in dropped}
        if dropped:
            warnings.warn(f"Dropped {len(dropped)} SimMIM key(s) a Swin classifier has no place for (the "
                          f"decoder, the mask token): {_first(dropped)}.", stacklevel=3)
    if any(re.match(r"^layers_\d+\.", k) for k in sd):  # timm features_only=True: layers_0. for layers.0.
        sd = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): v for k, v in sd.items()}
    stripped = True
    while stripped:  # in any order and nesting: torch.compile(DDP(m)) saves "_orig_mod.module."
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd, stripped = {k[len(prefix):]: v for k, v in sd.items()}, True
        if not stripped and _is_detector(sd):  # a detector or segmentor: its Swin backbone only
            rest = [k for k in sd if not k.startswith(("backbone.", "head."))]
            sd, stripped = {k: v for k, v in sd.items() if k not in rest}, True
            warnings.warn(f"Dropped {len(rest)} key(s) of the detector/segmentor around the backbone (necks, "
                          f"heads, queries, EMA copies): {_first(rest)}.", stacklevel=3)
    return sd


def _is_detector(sd: Mapping[str, torch.Tensor]) -> bool:
    """A Swin under ``backbone.`` beside other parts: a detector's or segmentor's checkpoint (mmdet, mmseg,
    the official detection/segmentation code), or an mmpretrain classifier (whose ``head.`` is kept)."""
    swin_keys = ("backbone.layers.", "backbone.stages.", "backbone.patch_embed.", "backbone.swin.",
                 "backbone.embeddings.patch_embeddings.")
    return (any(k.startswith(swin_keys) for k in sd)
            and not all(k.startswith(("backbone.", "head.")) for k in sd))


def _is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _BUFFER_LEAVES


def _detect_version(keys) -> int:
    v2 = ("logit_scale", "cpb_mlp.", "continuous_position_bias_mlp.", ".q_bias", ".v_bias")
    return 2 if any(any(s in k for s in v2) for k in keys) else 1


_UNSUPPORTED = (  # (key fragment, what the weights are): architectures a Swin key reader would misread
    (".attn.meta_mlp.", "timm's swinv2_cr_* (a different SwinV2 variant: post-norm, a meta MLP for the bias)"),
    ("absolute_pos_embed", "a Swin with absolute position embeddings (ape=True), which this package does not build"),
    ("embeddings.position_embeddings", "a Swin with absolute position embeddings (use_absolute_embeddings), "
                                       "which this package does not build"),
)


def _inspect(sd: Mapping[str, torch.Tensor]) -> _Info:
    keys = list(sd)
    for fragment, what in _UNSUPPORTED:
        if any(fragment in k for k in keys):
            raise ValueError(f"These weights are {what}; their keys (e.g. "
                             f"{next(k for k in keys if fragment in k)}) have no place in this implementation.")
    version = _detect_version(keys)
    if any(k.startswith("features.0.0.") or re.match(r"^features\.\d+\.\d+\.attn\.", k) for k in keys):
        return _Info("torchvision", version)
    if any(".attn.w_msa." in k or re.match(r"^(backbone\.)?stages\.\d+\.blocks\.\d+\.ffn\.layers\.", k)
           for k in keys):
        return _Info("mmdet", version)
    if any("embeddings.patch_embeddings." in k or re.match(r"^(swin|swinv2)\.", k) or
           re.match(r"^(swin\.|swinv2\.)?encoder\.layers\.", k) for k in keys):
        hf = None
        if version == 1:
            if any(".attention.q_proj." in k or ".relative_position_bias.relative_position_bias_table" in k
                   or ".mlp.fc1." in k for k in keys):
                hf = 5
            elif any(".attention.self." in k or ".intermediate.dense." in k for k in keys):
                hf = 4
        return _Info("hf", version, hf)
    if any(k.startswith(("layers.", "patch_embed.")) for k in keys):
        merges = {int(m.group(1)) for k in keys if (m := _MERGE_RE.match(k))}
        if merges and 0 not in merges:
            return _Info("timm", version)
        if not merges and any(k.startswith("head.fc.") for k in keys):
            return _Info("timm", version)
        return _Info("official" if any(_is_buffer(k) for k in keys) else "swin", version)
    raise ValueError(f"Cannot tell which Swin checkpoint format these weights are in: the first keys are "
                     f"{_first(keys)}; supported formats: {', '.join(FORMATS)}.")


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """The format of a state dict (or a training checkpoint holding one): one of :data:`FORMATS`."""
    return _inspect(_unwrap(state_dict)).fmt


# ---------------------------------------------------------------------------------------------
# Readers: foreign -> ours. Each returns (ours, unmatched foreign keys).
# ---------------------------------------------------------------------------------------------
def _stage_norms(out: dict, norms: Mapping[int, Mapping[str, torch.Tensor]], last: int) -> None:
    """Per-stage output norms {stage: {"weight": ..., "bias": ...}} of a detection/segmentation backbone:
    the last stage's is the classifier's final norm, the others ``out_norms.i``."""
    for i, params in norms.items():
        for name, v in params.items():
            out[f"norm.{name}" if i == last else f"out_norms.{i}.{name}"] = v


def _last_stage(ours: Mapping[str, torch.Tensor]) -> int:
    return max((int(m.group(1)) for k in ours if (m := _BLOCK_RE.match(k))), default=0)


def _read_official(sd, info):
    """Ours and the official classifier; also the official detection/segmentation backbone (Swin-Transformer-
    Object-Detection / -Semantic-Segmentation), whose stages' output norms are ``norm0..norm3``."""
    out, norms = {}, defaultdict(dict)
    for k, v in sd.items():
        if _is_buffer(k):
            continue
        if m := re.match(r"^norm(\d+)\.(weight|bias)$", k):
            norms[int(m.group(1))][m.group(2)] = v
        else:
            out[k] = v
    _stage_norms(out, norms, _last_stage(out))
    return out, []


def _read_timm(sd, info):
    out, bad = {}, []
    for k, v in sd.items():
        if _is_buffer(k):
            continue
        if m := _MERGE_RE.match(k):
            i = int(m.group(1))
            if i == 0:
                bad.append(k)
                continue
            out[f"layers.{i - 1}.downsample.{m.group(2)}"] = v
        elif k.startswith("head.fc."):
            out["head." + k[len("head.fc."):]] = v
        else:
            out[k] = v
    return out, bad


_TV_STEM = {"features.0.0.weight": "patch_embed.proj.weight", "features.0.0.bias": "patch_embed.proj.bias",
            "features.0.2.weight": "patch_embed.norm.weight", "features.0.2.bias": "patch_embed.norm.bias"}
_TV_LEAF = {"mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
            "mlp.3.weight": "mlp.fc2.weight", "mlp.3.bias": "mlp.fc2.bias"}


def _read_torchvision(sd, info):
    out, bad = {}, []
    for k, v in sd.items():
        if _is_buffer(k):
            continue
        if k in _TV_STEM:
            out[_TV_STEM[k]] = v
        elif m := re.match(r"^features\.(\d+)\.(\d+)\.(.+)$", k):
            n, j, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n % 2 == 0 or n == 0:
                bad.append(k)
                continue
            prefix = f"layers.{(n - 1) // 2}.blocks.{j}."
            if info.version == 2 and leaf == "attn.qkv.bias":
                C = v.shape[0] // 3
                out[prefix + "attn.q_bias"], out[prefix + "attn.v_bias"] = v[:C], v[2 * C:]
            else:
                out[prefix + _TV_LEAF.get(leaf, leaf)] = v
        elif m := re.match(r"^features\.(\d+)\.(reduction\.weight|norm\.weight|norm\.bias)$", k):
            n = int(m.group(1))
            if n % 2 or n == 0:
                bad.append(k)
                continue
            out[f"layers.{n // 2 - 1}.downsample.{m.group(2)}"] = v
        elif k in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            out[k] = v
        else:
            bad.append(k)
    return out, bad


# HF leaves -> ours (None: one of q/k/v, assembled below).
_HF_COMMON = {"layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
              "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias"}
_HF5_V1 = {**_HF_COMMON,
           "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
           "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
           "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
           "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}
_HF5_QKV = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF4_V1 = {**_HF_COMMON,
           "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
           "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
           "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
           "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias"}
_HF4_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
_HF_V2 = {**{k: v for k, v in _HF4_V1.items() if "relative_position" not in k},
          "attention.self.logit_scale": "attn.logit_scale",
          "attention.self.continuous_position_bias_mlp.0.weight": "attn.cpb_mlp.0.weight",
          "attention.self.continuous_position_bias_mlp.0.bias": "attn.cpb_mlp.0.bias",
          "attention.self.continuous_position_bias_mlp.2.weight": "attn.cpb_mlp.2.weight",
          "attention.self.query.bias": "attn.q_bias", "attention.self.value.bias": "attn.v_bias"}


def _hf_tables(version: int, hf_version: int | None):
    if version == 2:
        return _HF_V2, _HF4_QKV  # V2 kept the 4.x q/k/v names
    return (_HF4_V1, _HF4_QKV) if hf_version == 4 else (_HF5_V1, _HF5_QKV)


def _read_hf(sd, info):
    out, bad = {}, []
    if info.version == 2:
        tables = [_hf_tables(2, None)]
    else:  # accept either naming (a dict that mixes both is still read)
        tables = [_hf_tables(1, 5), _hf_tables(1, 4)]
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    norms: dict[int, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    dropped: list[str] = []
    for k, v in sd.items():
        if _is_buffer(k):
            continue
        key = re.sub(r"^(swin|swinv2)\.", "", k)
        if key == "embeddings.mask_token" or key.startswith("decoder."):  # SwinForMaskedImageModeling
            dropped.append(k)
        elif key.startswith("embeddings."):
            rest = key[len("embeddings."):]
            mapped = {"patch_embeddings.projection.weight": "patch_embed.proj.weight",
                      "patch_embeddings.projection.bias": "patch_embed.proj.bias",
                      "norm.weight": "patch_embed.norm.weight", "norm.bias": "patch_embed.norm.bias"}.get(rest)
            if mapped is None:
                bad.append(k)
            else:
                out[mapped] = v
        elif m := re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            prefix, leaf = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            for names, split in tables:
                if leaf in names:
                    out[prefix + names[leaf]] = v
                    break
                stem, _, param = leaf.rpartition(".")
                if stem in split and param in ("weight", "bias") and not (info.version == 2 and param == "bias"):
                    qkv.setdefault((prefix, "attn.qkv." + param), {})[split[stem]] = v
                    break
            else:
                bad.append(k)
        elif m := re.match(r"^encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", key):
            out[f"layers.{m.group(1)}.downsample.{m.group(2)}"] = v
        elif key in ("layernorm.weight", "layernorm.bias"):
            out["norm." + key.split(".")[1]] = v
        elif key in ("classifier.weight", "classifier.bias"):
            out["head." + key.split(".")[1]] = v
        elif m := re.match(r"^hidden_states_norms\.stage(\d+)\.(weight|bias)$", key):  # SwinBackbone
            norms[int(m.group(1))][m.group(2)] = (k, v)
        elif key.startswith("hidden_states_norms.stem."):  # out_features with "stem": no stem map here
            dropped.append(k)
        else:
            bad.append(k)
    _stage_norms(out, {i - 1: {name: v for name, (_, v) in params.items()} for i, params in norms.items()},
                 _last_stage(out))
    if dropped:
        warnings.warn(f"Dropped {len(dropped)} transformers key(s) a Swin model has no place for (the masked-"
                      f"image-modelling decoder and mask token, a SwinBackbone's stem norm): {_first(dropped)}.",
                      stacklevel=3)
    for (prefix, name), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            bad.append(f"{prefix}{name} (only {len(parts)} of query/key/value present)")
            continue
        out[prefix + name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out, bad


def _unfold_to_official(w: torch.Tensor) -> torch.Tensor:
    """Patch-merging input channels: nn.Unfold order (c, kh, kw) -> official concat order (kh + 2 kw, c)."""
    lead = w.shape[:-1]
    C = w.shape[-1] // 4
    return w.reshape(*lead, C, 4).transpose(-1, -2)[..., [0, 2, 1, 3], :].reshape(*lead, 4 * C)


def _official_to_unfold(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_unfold_to_official` (the permutation [0, 2, 1, 3] is its own inverse)."""
    lead = w.shape[:-1]
    C = w.shape[-1] // 4
    return w.reshape(*lead, 4, C)[..., [0, 2, 1, 3], :].transpose(-1, -2).reshape(*lead, 4 * C)


_MM_LEAF = {"ffn.layers.0.0.weight": "mlp.fc1.weight", "ffn.layers.0.0.bias": "mlp.fc1.bias",
            "ffn.layers.1.weight": "mlp.fc2.weight", "ffn.layers.1.bias": "mlp.fc2.bias"}
_MM_DROP_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.", "rpn_head.", "roi_head.", "bbox_head.",
                     "mask_head.", "panoptic_head.", "panoptic_fusion_head.", "query_head.", "data_preprocessor.",
                     "semantic_head.", "encoder.", "decoder.")


def _read_mmdet(sd, info):
    out, bad, dropped, norms = {}, [], [], defaultdict(dict)
    keys = {k[len("backbone."):] if k.startswith("backbone.") else k: k for k in sd}
    merges = {int(m.group(1)) for k in keys if (m := re.match(r"^stages\.(\d+)\.downsample\.", k))}
    at_start = bool(merges) and 0 not in merges  # mmpretrain V2 merges at the start of the next stage
    stages = {int(m.group(1)) for k in keys if (m := re.match(r"^stages\.(\d+)\.", k))}
    last = max(stages) if stages else 0
    for key, k in keys.items():
        v = sd[k]
        if _is_buffer(key):
            continue
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            prefix, leaf = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if leaf.startswith("attn.w_msa."):
                out[prefix + "attn." + leaf[len("attn.w_msa."):]] = v
            elif leaf in _MM_LEAF:
                out[prefix + _MM_LEAF[leaf]] = v
            else:
                out[prefix + leaf] = v  # norm1/norm2; anything else is caught by the key check
        elif m := re.match(r"^stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", key):
            i = int(m.group(1)) - (1 if at_start else 0)
            leaf = m.group(2)
            if leaf == "reduction.weight" or info.version == 1:  # V1 norms the 4C unfold vector
                v = _unfold_to_official(v)
            out[f"layers.{i}.downsample.{leaf}"] = v
        elif key.startswith("patch_embed.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = v
        elif key in ("patch_embed.norm.weight", "patch_embed.norm.bias"):
            out[key] = v
        elif m := re.match(r"^norm(\d+)\.(weight|bias)$", key):
            norms[int(m.group(1))][m.group(2)] = v
        elif key.startswith("head.fc."):
            out["head." + key[len("head.fc."):]] = v
        elif k.startswith(_MM_DROP_PREFIXES):
            dropped.append(k)
        else:
            bad.append(k)
    _stage_norms(out, norms, last)
    if dropped:
        warnings.warn(f"Dropped {len(dropped)} mmdet/mmseg/mmpretrain key(s) a Swin model has no place for "
                      f"(necks, heads): {_first(dropped)}.", stacklevel=3)
    return out, bad


_READERS = {"swin": _read_official, "official": _read_official, "timm": _read_timm,
            "torchvision": _read_torchvision, "hf": _read_hf, "mmdet": _read_mmdet}


def _check_ours(sd: Mapping[str, torch.Tensor], info: _Info, bad: list[str]) -> None:
    for k in sd:
        if k in _TOP_KEYS or _OUT_NORM_RE.match(k):
            continue
        if (m := _BLOCK_RE.match(k)) and m.group(3) in _BLOCK_LEAVES:
            continue
        if (m := _MERGE_RE.match(k)) and m.group(2) in _MERGE_LEAVES:
            continue
        bad.append(k)
    if bad:
        raise ValueError(f"These weights, read as format {info.describe()}, have keys that do not fit that "
                         f"format or this Swin implementation: {_first(bad)}.")


# ---------------------------------------------------------------------------------------------
# Writers: ours -> foreign
# ---------------------------------------------------------------------------------------------
def _blocks(sd) -> list[tuple[int, int]]:
    return sorted({(int(m.group(1)), int(m.group(2))) for k in sd if (m := _BLOCK_RE.match(k))})


def _window_of(sd, i: int, j: int, version: int, window_size: int | None, fmt: str) -> int:
    if version == 1:
        rows = sd[f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"].shape[0]
        side = round(rows ** 0.5)
        return (side + 1) // 2
    if window_size is None:
        raise ValueError(f"Writing SwinV2 weights in the '{fmt}' layout needs the window size (its buffers depend "
                         f"on it and V2 weights do not record it): pass config= or window_size= (swin convert: --model NAME).")
    return window_size


def _index_buffer(window: int) -> torch.Tensor:
    return W.relative_index(window, window, torch.device("cpu")).clone()  # (N, N) long


def _coords_buffer(window: int, pretrained: int) -> torch.Tensor:
    table = W.log_coords(window, pretrained, torch.device("cpu")).clone()  # ((2M-1)^2, 2)
    return table.view(1, 2 * window - 1, 2 * window - 1, 2)


def _write_swin(sd, version, opts):
    return dict(sd)


def _shrink_tables(sd, config: SwinConfig | None) -> dict:
    """timm and the official code give a block whose map (at the config's image size) is smaller than
    the window a window of the map's size, and a bias table to match: the centre of ours."""
    out = dict(sd)
    for k, v in sd.items():
        window = _stage_window(config, k) if config is not None and k.endswith("relative_position_bias_table") else None
        if window is not None and 2 * window - 1 < round(v.shape[0] ** 0.5):
            out[k] = _crop_bias_table(v, window)
    return out


def _write_official(sd, version, opts):
    config: SwinConfig | None = opts["config"]
    if version == 2 and config is None and opts["window_size"] is not None:
        warnings.warn("Without config=, the official layout's relative_coords_table buffers are written for "
                      "pretrained_window_sizes 0 and for windows not shrunk to a smaller map; pass config= (swin "
                      "convert --model NAME) for a model with either, or they will say so when loaded.", stacklevel=3)
    sd = _shrink_tables(sd, config)
    out = dict(sd)
    if any(_OUT_NORM_RE.match(k) for k in sd):  # the official detection code's norm0..norm3
        backbone = not any(k.startswith("head.") for k in sd)  # (a classifier keeps its final norm as norm)
        last = _last_stage(sd)
        for k in list(out):
            if m := _OUT_NORM_RE.match(k):
                out[f"norm{m.group(1)}.{m.group(2)}"] = out.pop(k)
            elif k.startswith("norm.") and backbone:
                out[f"norm{last}." + k[len("norm."):]] = out.pop(k)
    for i, j in _blocks(sd):
        p = f"layers.{i}.blocks.{j}.attn."
        # a map smaller than the window is one window of the map's size (the official rule; V1's table
        # already says so after _shrink_tables, V2's MLP does not)
        M = _stage_window(config, p) or _window_of(sd, i, j, version, opts["window_size"], "official")
        out[p + "relative_position_index"] = _index_buffer(M)
        if version == 2:
            pre = config.pretrained_window_sizes[i] if config is not None else 0
            out[p + "relative_coords_table"] = _coords_buffer(M, pre)
        if config is not None and j % 2 == 1:
            # The official model fixes its mask at the training resolution (it asserts that size).
            H = config.img_size[0] // config.patch_size // 2**i
            Wd = config.img_size[1] // config.patch_size // 2**i
            window, shift = W.window_and_shift(H, Wd, M, M // 2)
            if shift and H % window == 0 and Wd % window == 0:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = W.shift_mask(H, Wd, window, shift, False,
                                                                       torch.device("cpu")).clone()
    return out


def _write_timm(sd, version, opts):
    out = {}
    for k, v in _shrink_tables(sd, opts["config"]).items():
        if m := _MERGE_RE.match(k):
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
        elif k.startswith("head."):
            out["head.fc." + k[len("head."):]] = v
        else:
            out[k] = v
    return out


def _write_torchvision(sd, version, opts):
    out = {}
    stem = {v: k for k, v in _TV_STEM.items()}
    leaf_map = {v: k for k, v in _TV_LEAF.items()}
    pretrained = opts["config"].pretrained_window_sizes if opts["config"] is not None else ()
    if version == 2 and any(p and p != opts["window_size"] for p in pretrained):
        warnings.warn("torchvision's SwinV2 scales position coordinates by its own window size and cannot express "
                      f"pretrained_window_sizes={pretrained}; the converted model will compute a different "
                      "position bias.", stacklevel=3)
    for k, v in sd.items():
        if k in stem:
            out[stem[k]] = v
        elif m := _BLOCK_RE.match(k):
            i, j, leaf = int(m.group(1)), m.group(2), m.group(3)
            prefix = f"features.{2 * i + 1}.{j}."
            if leaf == "attn.q_bias":
                v_bias = sd[k.replace("q_bias", "v_bias")]
                out[prefix + "attn.qkv.bias"] = torch.cat([v, torch.zeros_like(v), v_bias])
            elif leaf != "attn.v_bias":
                out[prefix + leaf_map.get(leaf, leaf)] = v
        elif m := _MERGE_RE.match(k):
            out[f"features.{2 * int(m.group(1)) + 2}.{m.group(2)}"] = v
        else:
            out[k] = v
    for i, j in _blocks(sd):
        M = _window_of(sd, i, j, version, opts["window_size"], "torchvision")
        prefix = f"features.{2 * i + 1}.{j}.attn."
        out[prefix + "relative_position_index"] = _index_buffer(M).flatten()
        if version == 2:
            out[prefix + "relative_coords_table"] = _coords_buffer(M, 0)  # torchvision: always its own window
    return out


def _installed_hf_major() -> int:
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 5


def _write_hf(sd, version, opts):
    hf_version = opts["hf_version"]
    names, split = _hf_tables(version, hf_version)
    inverse = {v: k for k, v in names.items()}
    qkv_names = {idx: stem for stem, idx in split.items()}
    p = "swinv2." if version == 2 else "swin."
    out = {}
    for k, v in sd.items():
        if m := _BLOCK_RE.match(k):
            prefix, leaf = f"{p}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
                param = leaf.rsplit(".", 1)[1]
                for idx, part in enumerate(v.chunk(3, dim=0)):
                    out[f"{prefix}{qkv_names[idx]}.{param}"] = part.clone()
            else:
                out[prefix + inverse[leaf]] = v
        elif m := _MERGE_RE.match(k):
            out[f"{p}encoder.layers.{m.group(1)}.downsample.{m.group(2)}"] = v
        elif k.startswith("patch_embed."):
            out[p + "embeddings." + {"proj": "patch_embeddings.projection", "norm": "norm"}[k.split(".")[1]]
                + "." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out[p + "layernorm." + k.split(".")[1]] = v
        elif k.startswith("head."):
            out["classifier." + k.split(".")[1]] = v
        elif m := _OUT_NORM_RE.match(k):  # V1 backbone: SwinBackbone's hidden_states_norms.stage1..
            out[f"hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"] = v
    backbone = any(_OUT_NORM_RE.match(k) for k in sd)  # (convert_state_dict keeps them for a V1 backbone only)
    if backbone:  # its last stage's: the final norm
        for name in ("weight", "bias"):
            out[f"hidden_states_norms.stage{_last_stage(sd) + 1}.{name}"] = sd["norm." + name]
    if version == 1 and hf_version == 4:  # transformers 4.x saved the (N, N) index (a persistent buffer)
        for i, j in _blocks(sd):
            M = _window_of(sd, i, j, 1, None, "hf")
            out[f"{p}encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"] = _index_buffer(M)
    if hf_version == 4 and backbone:  # 4.x SwinBackbone: embeddings, encoder and
        out = {k[len(p):] if k.startswith(p) else k: v for k, v in out.items()  # hidden_states_norms at the top,
               if not k.startswith(p + "layernorm.")}                            # no final layernorm
    return out


def _write_mmdet(sd, version, opts):
    out = {}
    last = _last_stage(sd)
    mm_leaf = {v: k for k, v in _MM_LEAF.items()}
    for k, v in sd.items():
        if m := _BLOCK_RE.match(k):
            prefix, leaf = f"backbone.stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if leaf.startswith("attn."):
                out[prefix + "attn.w_msa." + leaf[len("attn."):]] = v
            else:
                out[prefix + mm_leaf.get(leaf, leaf)] = v
        elif m := _MERGE_RE.match(k):
            i, leaf = int(m.group(1)), m.group(2)
            if leaf == "reduction.weight" or version == 1:
                v = _official_to_unfold(v)
            stage = i + 1 if version == 2 else i  # mmpretrain V2 merges at the start of the next stage
            out[f"backbone.stages.{stage}.downsample.{leaf}"] = v
        elif k.startswith("patch_embed.proj."):
            out["backbone.patch_embed.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("patch_embed.norm."):
            out["backbone." + k] = v
        elif k.startswith("norm."):
            out[f"backbone.norm{last}." + k.split(".")[1]] = v
        elif m := _OUT_NORM_RE.match(k):
            out[f"backbone.norm{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("head."):
            out["head.fc." + k.split(".")[1]] = v
    if version == 1:  # mmdet/mmpretrain V1 save the (N, N) index
        for i, j in _blocks(sd):
            M = _window_of(sd, i, j, 1, None, "mmdet")
            out[f"backbone.stages.{i}.blocks.{j}.attn.w_msa.relative_position_index"] = _index_buffer(M)
    return out


_WRITERS = {"swin": _write_swin, "official": _write_official, "timm": _write_timm,
            "torchvision": _write_torchvision, "hf": _write_hf, "mmdet": _write_mmdet}


def _format_name(name: str, role: str, allow_auto: bool) -> str:
    name = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if name in FORMATS or (allow_auto and name == "auto"):
        return name
    choices = ("auto, " if allow_auto else "") + ", ".join(FORMATS)
    raise ValueError(f"Unknown {role} format {name!r}; choose one of {choices}.")


def convert_state_dict(state_dict: Mapping[str, Any], src: str = "auto", dst: str = "swin", *,
                       hf_version: int | str | None = None, config: SwinConfig | None = None,
                       window_size: int | None = None) -> dict[str, torch.Tensor]:
    """Convert Swin weights between key schemes (see the module docstring for the formats).

    ``state_dict`` may be a training checkpoint (``{"model": ..., "ema": ...}``, ``module.`` prefixes);
    ``src="auto"`` detects the format. Saved buffers are dropped on read and, where the target format
    saves them, rebuilt on write. ``hf_version`` (4 or 5) picks the transformers naming to write
    (default: the installed version; 5 without transformers). ``config`` (or just ``window_size``) tells the writer what the
    weights cannot: the V2 window size, V2 pretrained window sizes, and the official training size.
    Raises ValueError naming the detected format and the first offending keys on any mismatch.
    """
    src = _format_name(src, "source", allow_auto=True)
    dst = _format_name(dst, "target", allow_auto=False)
    sd = _unwrap(state_dict)
    info = _inspect(sd)
    if src != "auto" and src != info.fmt and not {src, info.fmt} <= {"swin", "official"}:
        # Trust the caller's format but say what the keys looked like if they do not fit it.
        info = _Info(src, info.version, info.hf_version, detected=info.fmt)
    if config is not None and config.version != info.version:
        raise ValueError(f"These are {'SwinV2' if info.version == 2 else 'Swin V1'} weights (format {info.fmt!r}) "
                         f"and the given config is a {'SwinV2' if config.version == 2 else 'Swin V1'} model; "
                         "name a model of the weights' version.")
    ours, bad = _READERS[info.fmt](sd, info)
    _check_ours(ours, info, bad)
    if hf_version is not None:
        hf_version = int(str(hf_version).split(".")[0])
        if hf_version not in (4, 5):
            raise ValueError(f"hf_version must be 4 or 5, got {hf_version}.")
    if config is not None and window_size is None:
        window_size = config.window_size
    opts = {"hf_version": hf_version or _installed_hf_major(), "config": config, "window_size": window_size}
    out_norms = [k for k in ours if _OUT_NORM_RE.match(k)]
    hf_backbone = dst == "hf" and info.version == 1 and not any(k.startswith("head.") for k in ours)  # SwinBackbone
    if out_norms and dst not in ("swin", "official", "mmdet") and not hf_backbone:
        warnings.warn(f"The '{dst}' layout has no place for {'a classifier' if dst == 'hf' else 'a backbone'}'s "
                      f"per-stage output norms; dropped {_first(out_norms)} (the 'swin', 'official' and 'mmdet' "
                      "layouts keep them, and 'hf' for a V1 backbone without a head: SwinBackbone).", stacklevel=2)
        ours = {k: v for k, v in ours.items() if k not in out_norms}
    return _WRITERS[dst](ours, info.version, opts)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def read_file(path: str | os.PathLike) -> Any:
    """What a checkpoint file holds, read safely (weights_only / safetensors), before any unwrapping."""
    path = Path(path)
    if path.is_dir():
        path = folder_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist; check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"Could not read {str(path)!r} as safetensors ({type(e).__name__}); "
                             "is the file complete and really a .safetensors file?") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "global" not in str(e):  # not code, just not a pickle torch can read
            raise ValueError(f"Could not read checkpoint {str(path)!r} (it is not a PyTorch or safetensors "
                             "checkpoint, or it is truncated).") from None
        raise ValueError(
            f"Refused to load {str(path)!r}: it holds Python objects other than tensors (loading them could run "
            f"code), so it was not unpickled for safety; if you trust its source, load it once with "
            f"torch.load(path, weights_only=False) and re-save only the state dict (names -> tensors) with "
            f"torch.save or safetensors."
        ) from e
    except Exception as e:  # truncated or foreign files: zip errors, struct errors, EOF
        first = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else ""  # its first sentence
        raise ValueError(f"Could not read checkpoint {str(path)!r} ({type(e).__name__}: {first}); "
                         "is the file complete and a PyTorch or safetensors checkpoint?") from None


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes in its folder


def folder_checkpoint(folder: Path) -> Path:
    """The weights file of a transformers ``save_pretrained`` folder; ValueError for any other folder."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ValueError(f"{str(folder)!r} holds a sharded checkpoint; load it with transformers and save "
                         "its state dict as one file.")
    raise ValueError(f"{str(folder)!r} is a folder without {' or '.join(HF_WEIGHT_FILES)}; "
                     "give the checkpoint file itself.")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from training-checkpoint nesting, in its own key scheme.

    ``.safetensors`` or a torch pickle read with ``weights_only=True`` (a pickle holding other
    Python objects is refused with ValueError); a missing file raises FileNotFoundError.
    """
    return _unwrap(read_file(path))


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically (temp file in the same folder, then ``os.replace``).

    ``.safetensors`` paths use safetensors (tensors made contiguous, shared storage copied);
    anything else uses ``torch.save``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, tmp)
        else:
            torch.save(dict(state_dict), tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private: 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------
def _resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2M'-1)^2, heads), bicubic like the official fine-tuning code."""
    rows, heads = table.shape
    side, new_side = round(rows ** 0.5), 2 * window - 1
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"A relative_position_bias_table of {rows} rows is not (2M-1)^2 for a square window M; "
                         f"only square windows can be resized.")
    grid = table.float().permute(1, 0).reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).permute(1, 0).contiguous().to(table.dtype)


def _stage_window(config: SwinConfig | None, key: str) -> int | None:
    """The window the block of ``key`` (layers.I.blocks....) runs at on the config's nominal image size
    when its map is smaller than the configured window (the official rule: one window of the map's
    size); None otherwise. timm and the official code size that block's bias table for this smaller
    window."""
    m = re.match(r"^layers\.(\d+)\.", key)
    if config is None or m is None:
        return None
    runs = _stage_runs(config, int(m.group(1)))
    return runs if runs < config.window_size else None


def _stage_runs(config: SwinConfig, stage: int) -> int:
    """The window the blocks of ``stage`` run at on the config's nominal image size: the configured one, or
    one of the map's size where the map is smaller (the official rule)."""
    height, width = (-(-n // config.patch_size) for n in config.img_size)
    for _ in range(stage):  # patch merging halves the map, padding an odd side
        height, width = -(-height // 2), -(-width // 2)
    return min(config.window_size, height, width)


def _cpb_denominator(config: SwinConfig, stage: int) -> int:
    """What V2's log-spaced coordinates of ``stage`` are divided by (before the x8): the pretrained window
    minus one, or the window the stage runs at minus one (``windows._build_log_coords``)."""
    pre = config.pretrained_window_sizes[stage]
    return max((pre if pre > 0 else _stage_runs(config, stage)) - 1, 1)


def _coords_denominator(table: torch.Tensor) -> int | None:
    """The denominator a saved V2 ``relative_coords_table`` (official, torchvision) was built with, read off
    its entry at offset (0, +1): log2(8 / d + 1) / 3. None when the table cannot say (a 1 x 1 window)."""
    t = table.detach().float().reshape(-1, 2)
    side = round(t.shape[0] ** 0.5)
    if side * side != t.shape[0] or side < 3:
        return None
    m = (side + 1) // 2
    value = float(t.view(side, side, 2)[m - 1, m, 1])
    if not 0 < value < 10:
        return None
    d = 8 / (2 ** (3 * value) - 1)
    return round(d) if abs(d - round(d)) < 1e-2 else None


def _trained_cpb_denominators(sd: Mapping[str, torch.Tensor], src_config: SwinConfig | None,
                              config: SwinConfig) -> dict[int, int]:
    """{stage: denominator} that a V2 checkpoint's position-bias MLP was trained with, where it says: from the
    config it records (a swin run, a transformers folder's config.json) or its saved official coordinate
    tables. torchvision's say nothing (it always scales by its own window, whatever the weights were trained
    with), nor does a table built for a larger window than the model's block runs (the official layout
    written without a config has full-window tables even for a block whose map was smaller, and a model
    run at a smaller image size is the user's choice)."""
    if src_config is not None and src_config.version == 2:
        return {i: _cpb_denominator(src_config, i) for i in range(src_config.num_layers)}
    found: dict[int, int] = {}
    for k, v in sd.items():  # the official layout (and timm's, had it kept them); torchvision's always says M - 1
        if not (m := re.search(r"(?:^|\.)layers\.(\d+)\.blocks\.\d+\.attn\.relative_coords_table$", k)):
            continue
        stage, side = int(m.group(1)), round(v[..., 0].numel() ** 0.5)  # side: 2M - 1 for the window M built for
        if (stage < config.num_layers and (side + 1) // 2 <= _stage_runs(config, stage)
                and (d := _coords_denominator(v)) is not None):
            found.setdefault(stage, d)
    return found


def _source_config(obj: Any, path: str | os.PathLike | None) -> SwinConfig | None:
    """The model config a checkpoint records, where it does: a swin run's ``model_config``, or the
    config.json beside a transformers ``save_pretrained`` folder's weights. None otherwise."""
    from .train import run_config

    try:
        if isinstance(obj, Mapping) and (config := run_config(dict(obj))) is not None:
            return config
    except (TypeError, ValueError):  # a config of another version of swin (an unknown field): no geometry known
        return None
    if path is None or not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        return None
    try:
        c = json.loads((Path(path) / "config.json").read_text())
        size = c.get("image_size", 224)
        depths = tuple(c["depths"])
        return SwinConfig(version=2 if "v2" in str(c.get("model_type", "")) else 1,
                          img_size=tuple(size) if isinstance(size, (list, tuple)) else (size, size),
                          patch_size=int(c.get("patch_size", 4)), window_size=int(c["window_size"]), depths=depths,
                          num_heads=tuple(c.get("num_heads", (1,) * len(depths))), embed_dim=int(c.get("embed_dim", 96)),
                          pretrained_window_sizes=tuple(c.get("pretrained_window_sizes", (0,) * len(depths))))
    except (ValueError, KeyError, TypeError, OSError):  # not a Swin config we can read: no geometry known
        return None


def _crop_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2m-1)^2, heads), m <= M: the rows a window of m tokens reads (the centre)."""
    side, new_side = round(table.shape[0] ** 0.5), 2 * window - 1
    o = (side - new_side) // 2
    return table.view(side, side, -1)[o:o + new_side, o:o + new_side].reshape(new_side * new_side, -1).clone()


def _embed_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2m-1)^2, heads) -> ((2M-1)^2, heads), M >= m: the small table in the centre of a zero table.
    A window of m tokens reads exactly these rows of the big one (``windows.relative_index``), so a
    table saved for a block whose map was smaller than the window loads exactly."""
    rows, heads = table.shape
    side, new_side = round(rows ** 0.5), 2 * window - 1
    big = table.new_zeros(new_side, new_side, heads)
    o = (new_side - side) // 2
    big[o:o + side, o:o + side] = table.view(side, side, heads)
    return big.view(new_side * new_side, heads)


def _check_cpb_coordinates(trained: Mapping[int, int], config: SwinConfig) -> None:
    """Warn when V2 weights' position-bias MLP was trained on coordinates scaled for another window than the
    model scales them for (``pretrained_window_sizes``): the official code and timm load such weights silently,
    and the biases then differ (~1% of the logits for a window12to16 checkpoint in a plain w16 model)."""
    off = [i for i, d in sorted(trained.items()) if i < config.num_layers and d != _cpb_denominator(config, i)]
    if not off:
        return
    fit = tuple(trained[i] + 1 if i in trained else config.pretrained_window_sizes[i] for i in range(config.num_layers))
    warnings.warn(f"These SwinV2 weights (their saved coordinate tables or recorded config) scale position "
                  f"coordinates for a {trained[off[0]] + 1}-token window at stage {off[0]}, where this model scales them for "
                  f"{_cpb_denominator(config, off[0]) + 1} (stages {off}); its position biases will differ from the "
                  f"checkpoint's model. Create the model with pretrained_window_sizes={fit} (as the official "
                  f"fine-tuning configs set it) to keep them.", stacklevel=3)


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    strict: bool = True, source: str | os.PathLike | None = None) -> LoadResult:
    """Load Swin weights of any supported format into ``model`` (a :class:`swin.SwinTransformer`).

    Accepts a ``.pth``/``.pt``/``.bin``/``.safetensors`` path, a transformers ``save_pretrained``
    folder, or an in-memory (possibly nested) checkpoint. Pickled files are read with
    ``weights_only=True``. Bias tables are resized bicubically (the official fine-tuning rule) to the
    window each block runs at the model's own image size: the model's window, or a window of the map's
    size where the map is smaller (timm and the official code shrink such a block's window and table);
    such a table goes in the centre of the model's, which is what that block reads. The source's window is
    what its table is sized for in the other layouts; ours keeps full tables, so a swin run checkpoint's
    recorded config says which centre its blocks trained (without one, a table that fits loads as it is).
    SwinV2 weights whose coordinate scaling is known (saved coordinate tables, a run's config, a
    transformers folder's config.json) and differs from the model's ``pretrained_window_sizes`` warn,
    naming the setting that keeps it (``source``: the file or folder an in-memory checkpoint was read from,
    for a transformers folder's config.json). A head of another
    class count (or none at all) is left as it is in the model, with a warning, and its keys are
    reported missing. Per-stage output norms (``out_norms``) are treated the same way: a checkpoint's norms
    that the model has no place for are dropped with a warning, and a model's norms that the checkpoint
    lacks are left as initialised, with a warning, and reported missing. With ``strict=True`` any other
    missing, unexpected or mis-shaped key raises ValueError.
    """
    raw = path_or_state_dict
    path = raw if isinstance(raw, (str, os.PathLike)) else None
    obj = read_file(path) if path is not None else raw
    sd = _unwrap(obj)
    src_config = _source_config(obj, path or source)  # the geometry the weights were trained at, where recorded
    info = _inspect(sd)
    version = getattr(getattr(model, "config", None), "version", info.version)
    if version != info.version:
        have, want = ("SwinV2", "Swin V1") if info.version == 2 else ("Swin V1", "SwinV2")
        raise ValueError(f"These are {have} weights and the model is a {want}; create a {have} model "
                         f"(e.g. {'swinv2_t_w8' if info.version == 2 else 'swin_t'}) to load them.")
    ours = convert_state_dict(sd, src=info.fmt, dst="swin")
    target = model.state_dict()

    tables = {k: v for k, v in ours.items() if k.endswith("relative_position_bias_table") and k in target}
    config = getattr(model, "config", None)
    # some tables already fit: the checkpoint has the model's window, so a smaller one was shrunk for its map
    same_window = any(v.shape == target[k].shape for k, v in tables.items())
    resized_full: list[str] = []
    for k, v in tables.items():
        window = (round(target[k].shape[0] ** 0.5) + 1) // 2
        stored = (round(v.shape[0] ** 0.5) + 1) // 2
        # the window this block runs at the model's own size: smaller than ``window`` where its map is
        # (the official model's table there has that size, and ours reads only its centre rows)
        runs = _stage_window(config, k) or window
        # the window the checkpoint's block ran at: timm and the official code size a table for it (a shrunk
        # block has a shrunk table); ours keeps full tables, so a run's recorded config says; without one (and
        # in torchvision's, transformers' and mmdet's layouts, whose tables are always full) a table that
        # fits is taken as trained for this model
        if info.fmt in ("official", "timm"):
            trained, shrunk = stored, same_window and stored < window
        elif info.fmt == "swin" and src_config is not None and src_config.version == 1:
            trained = min(stored, _stage_window(src_config, k) or src_config.window_size)
            shrunk = trained < src_config.window_size
        else:
            trained, shrunk = (runs if v.shape == target[k].shape else stored), False
        if trained == runs and v.shape == target[k].shape:
            continue
        if trained < stored:  # only the centre was ever read (and trained): the rest is its initial values
            v = _crop_bias_table(v, trained)
        if trained != runs:  # another window: resized, as the official fine-tuning does
            if v.shape == target[k].shape:  # a full table, a block whose map is smaller
                resized_full.append(k)
            if shrunk and trained < runs and config is not None:
                warnings.warn(f"{k} was trained for a {trained} x {trained} window (a stage map smaller than the window "
                              f"at the checkpoint's image size); it was resized to the {runs} x {runs} window this "
                              f"block runs at the model's {config.img_size[0]} px. To run the model at the "
                              "checkpoint's size with its exact weights, create it with that img_size.",
                              stacklevel=2)
            v = _resize_bias_table(v, runs)
        ours[k] = v if runs == window else _embed_bias_table(v, window)
    if resized_full and config is not None:
        warnings.warn(f"{_first(resized_full, 2)}: full-window tables in a layout that sizes a table for the window "
                      f"its block ran at (timm, official) were resized to the smaller window those blocks run at the "
                      f"model's {config.img_size[0]} px, as those libraries do. If swin wrote these weights without "
                      "the model's config, every table is full: convert with config= (swin convert --model) to load "
                      "them exactly.", stacklevel=2)

    if version == 2 and isinstance(config, SwinConfig):
        _check_cpb_coordinates(_trained_cpb_denominators(sd, src_config, config), config)

    head_keys = [k for k in ("head.weight", "head.bias") if k in target]
    ckpt_head = [k for k in ("head.weight", "head.bias") if k in ours]
    head_missing: list[str] = []
    got = ours["head.weight"].shape[0] if "head.weight" in ours else None
    want = target["head.weight"].shape[0] if "head.weight" in target else 0
    if ckpt_head and got != want:  # another class count (a head of another width is a plain mismatch)
        warnings.warn(f"Checkpoint head has {got} classes and the model {want}; the head was not loaded and is left "
                      f"as it is in the model (freshly initialised in a new one).", stacklevel=2)
        for k in ckpt_head:
            del ours[k]
        head_missing = head_keys
    elif not ckpt_head and head_keys:
        warnings.warn("The checkpoint has no classifier head (a backbone checkpoint); the model's head is left as "
                      "it is in the model (freshly initialised in a new one).", stacklevel=2)
        head_missing = head_keys

    ckpt_norms = [k for k in ours if _OUT_NORM_RE.match(k)]
    model_norms = [k for k in target if _OUT_NORM_RE.match(k)]
    if ckpt_norms and not model_norms:
        warnings.warn("The checkpoint holds per-stage output norms (a detection/segmentation backbone); this model "
                      "has none, so they were not loaded. Create the model with out_norms=True to use them.",
                      stacklevel=2)
        for k in ckpt_norms:
            del ours[k]
    norms_missing = [k for k in model_norms if k not in ours]
    if norms_missing:  # a classifier's weights into a backbone: those norms start as the model has them
        warnings.warn(f"The checkpoint has no output norm for {len(norms_missing) // 2} of the model's stages "
                      f"({_first(norms_missing)}); those are left as they are in the model (freshly initialised "
                      "in a new one), as detection libraries start them from ImageNet weights.", stacklevel=2)
        head_missing = head_missing + norms_missing
    missing = [k for k in target if k not in ours and k not in head_missing]
    unexpected = [k for k in ours if k not in target]
    mismatched = [f"{k} {tuple(ours[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in ours if k in target and ours[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape {_first(mismatched, 3)}")
        raise ValueError(f"Weights read as format {info.describe()} do not fit this model "
                         f"({type(model).__name__}): {'; '.join(parts)}.")
    usable = {k: v for k, v in ours.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(usable, strict=False)
    bad_shape = [k for k in ours if k in target and ours[k].shape != target[k].shape]
    return LoadResult(missing_keys=missing + head_missing + bad_shape, unexpected_keys=unexpected)
