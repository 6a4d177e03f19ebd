"""Checkpoints: official ConvMAE state dicts <-> ours; the names of our safetensors format
(written and read by ``convmae.pretrained``).

Official key names (Alpha-VL/ConvMAE ``models_convmae.py`` / ``models_convvit.py``) map onto ours:

    patch_embed{1,2,3}.*        encoder.stage{1,2,3}_embed.*
    patch_embed4.*              encoder.token_proj.*
    pos_embed                   encoder.pos_embed
    blocks{1,2}.i.conv1/attn/conv2/norm1/norm2/mlp.*
                                encoder.stage{1,2}_blocks.i.pw_in/dw/pw_out/norm1/norm2/mlp.*
    blocks3.i.*                 encoder.stage3_blocks.i.*
    stage{1,2}_output_decode.*  fuse_stage{1,2}.*
    norm.*                      encoder_norm.*
    decoder_embed / mask_token / decoder_pos_embed / decoder_blocks / decoder_norm / decoder_pred
                                decoder.embed / .mask_token / .pos_embed / .blocks / .norm / .pred
    fc_norm.*, head.*           fc_norm.*, head.*   (fine-tuned ConvViT checkpoints)

The official 1x1 convs are (C, C, 1, 1) Conv2d weights; ours are (C, C) pointwise Linear weights.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``, with only
``argparse.Namespace`` (the ``args`` entry of official training checkpoints) allowed, or
safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .configs import ModelConfig, config_from_dict

CheckpointSource = Union[str, os.PathLike, IO[bytes], Mapping[str, Any]]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "convmae"
FORMAT_VERSION = 1
# What a save_pretrained directory holds (config.json "architecture"; absent means pretrain).
PRETRAIN = "pretrain"
BACKBONE = "backbone"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model; names every offending key."""

    def __init__(
        self,
        summary: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [summary]
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): {_preview(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): {_preview(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in self.mismatched]
            lines.append(f"mis-shaped keys ({len(shapes)}): {_preview(shapes)}")
        super().__init__("\n  ".join(lines))


def _preview(items: list[str], limit: int = 25) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Key mapping

# (official prefix, our prefix); keys without a trailing dot are whole parameter names.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("patch_embed1.", "encoder.stage1_embed."),
    ("patch_embed2.", "encoder.stage2_embed."),
    ("patch_embed3.", "encoder.stage3_embed."),
    ("patch_embed4.", "encoder.token_proj."),
    ("blocks1.", "encoder.stage1_blocks."),
    ("blocks2.", "encoder.stage2_blocks."),
    ("blocks3.", "encoder.stage3_blocks."),
    ("stage1_output_decode.", "fuse_stage1."),
    ("stage2_output_decode.", "fuse_stage2."),
    ("norm.", "encoder_norm."),
    ("fc_norm.", "fc_norm."),
    ("head.", "head."),
    ("decoder_embed.", "decoder.embed."),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
)
_NAMES: tuple[tuple[str, str], ...] = (
    ("pos_embed", "encoder.pos_embed"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.pos_embed"),
)
# Inside conv blocks (official CBlock): the depthwise conv is called "attn" there.
_CONV_BLOCK_PARTS = (("conv1.", "pw_in."), ("attn.", "dw."), ("conv2.", "pw_out."))
_OFFICIAL_CONV_BLOCK = re.compile(r"^blocks[12]\.\d+\.")
_OUR_CONV_BLOCK = re.compile(r"^encoder\.stage[12]_blocks\.\d+\.")
_OUR_POINTWISE_WEIGHT = re.compile(r"^encoder\.stage[12]_blocks\.\d+\.(pw_in|pw_out|mlp\.fc1|mlp\.fc2)\.weight$")


def _swap_prefix(key: str, pairs: Iterable[tuple[str, str]], forward: bool) -> str | None:
    for official, ours in pairs:
        src, dst = (official, ours) if forward else (ours, official)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def official_key_to_ours(key: str) -> str | None:
    """Our name for an official parameter name, or None if the official model has no such key."""
    for official, ours in _NAMES:
        if key == official:
            return ours
    block = _OFFICIAL_CONV_BLOCK.match(key)
    if block:
        head, rest = key[: block.end()], key[block.end() :]
        rest = _swap_prefix(rest, _CONV_BLOCK_PARTS, forward=True) or rest
        key = head + rest
    return _swap_prefix(key, _PREFIXES, forward=True)


def our_key_to_official(key: str) -> str | None:
    for official, ours in _NAMES:
        if key == ours:
            return official
    block = _OUR_CONV_BLOCK.match(key)
    if block:
        head, rest = key[: block.end()], key[block.end() :]
        rest = _swap_prefix(rest, _CONV_BLOCK_PARTS, forward=False) or rest
        key = head + rest
    return _swap_prefix(key, _PREFIXES, forward=False)


def looks_official(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("patch_embed1.", "blocks1.", "blocks3.")) for k in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official names and shapes -> ours. Returns (converted, official keys we do not know)."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        ours = official_key_to_ours(key)
        if ours is None:
            unknown.append(key)
            continue
        if _OUR_POINTWISE_WEIGHT.match(ours) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[0], value.shape[1])
        converted[ours] = value
    return converted, unknown


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names and shapes -> official ones (1x1 conv weights back to 4-D)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        official = our_key_to_official(key)
        if official is None:
            raise KeyError(f"parameter {key!r} has no counterpart in the official model")
        if _OUR_POINTWISE_WEIGHT.match(key):
            value = value.reshape(value.shape[0], value.shape[1], 1, 1)
        out[official] = value.detach().contiguous()
    return out


def export_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names and shapes (ConvMAE or backbone)."""
    return to_official_state_dict(model.state_dict())


# ---------------------------------------------------------------------------------------------
# Reading files safely


def read_checkpoint(src: CheckpointSource) -> dict[str, Any]:
    """A checkpoint's top-level dict from a path, a binary file object or an in-memory mapping."""
    if isinstance(src, Mapping):
        return dict(src)
    if isinstance(src, (str, os.PathLike)) and str(src).endswith(".safetensors"):
        return load_file(str(src), device="cpu")
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        return load_file(str(Path(src) / WEIGHTS_FILE), device="cpu")
    try:
        with _allow_namespace():
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            "refusing to load checkpoint: it contains pickled objects other than tensors and plain "
            f"containers, and we never unpickle arbitrary objects ({e})"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a dict")
    return dict(obj)


class _allow_namespace:
    """Allow argparse.Namespace in weights-only unpickling (official checkpoints store ``args``)."""

    def __enter__(self) -> None:
        self._ctx = None
        if hasattr(torch.serialization, "safe_globals"):
            self._ctx = torch.serialization.safe_globals([argparse.Namespace])
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def extract_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: its 'model' (official/MAE) or 'state_dict' entry, or itself."""
    for wrapper in ("model", "state_dict"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("checkpoint contains no tensors (expected a state_dict or a dict with 'model')")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Loading into our models


@dataclass
class KeyComparison:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> KeyComparison:
    result = KeyComparison()
    result.missing = sorted(set(expected) - set(given))
    result.unexpected = sorted(set(given) - set(expected))
    for key in sorted(set(expected) & set(given)):
        if tuple(expected[key].shape) != tuple(given[key].shape):
            result.mismatched.append((key, tuple(given[key].shape), tuple(expected[key].shape)))
    return result


def load_official_checkpoint(src: CheckpointSource, model: nn.Module) -> nn.Module:
    """Load an official ConvMAE checkpoint (path, file object, checkpoint dict or state_dict).

    ``model`` is a ``ConvMAE`` (strict: every key must match in name and shape) or a
    ``ConvMAEBackbone`` (decoder and fusion weights are ignored, see its loader). Raises
    ``CheckpointMismatchError`` naming the offending keys under their official names.
    """
    state = extract_state_dict(read_checkpoint(src))
    if not looks_official(state):
        raise CheckpointMismatchError(
            "not an official ConvMAE checkpoint (no patch_embed1.* / blocks1.* / blocks3.* keys)",
            unexpected=list(state)[:50],
        )
    if hasattr(model, "load_pretrain_state_dict"):
        model.load_pretrain_state_dict(state)
        return model
    converted, unknown = convert_official_state_dict(state)
    diff = compare_keys(model.state_dict(), converted)
    if unknown or not diff.ok:
        expected_official = {our_key_to_official(k) or k for k in diff.missing}
        raise CheckpointMismatchError(
            f"official checkpoint does not match this {type(model).__name__} "
            f"(config: {getattr(model, 'config', None)})",
            missing=expected_official,
            unexpected=unknown + [our_key_to_official(k) or k for k in diff.unexpected],
            mismatched=[(our_key_to_official(k) or k, c, m) for k, c, m in diff.mismatched],
        )
    model.load_state_dict(converted, strict=True)
    return model


def read_pretrained_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{Path(path) / CONFIG_FILE} holds {type(meta).__name__}, not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a ConvMAE pretrained directory (format={meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported ConvMAE checkpoint version {meta.get('version')!r}")
    return meta


def load_pretrained_config(path: str | os.PathLike) -> ModelConfig:
    return config_from_dict(read_pretrained_meta(path)["config"])
