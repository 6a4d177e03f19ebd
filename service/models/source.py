"""Where a downstream job's model comes from: one ``--model`` string, one loaded model.

Accepted sources (``load_model_source``):

- ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``, ``models:/m-ID``
  (MLflow Model Registry / logged models) and ``runs:/RUN_ID/model``: the model registered by
  ``jobs/pretrain.py`` or ``jobs/finetune.py``. The MLflow run that produced it is looked up, so
  results can be logged back onto that run.
- a local ``save_pretrained`` folder (``config.json`` + ``model.safetensors``);
- a Ray Train checkpoint folder of our own runs (DeepSpeed shards under ``ds/``, any ZeRO
  stage), consolidated to fp32;
- a checkpoint file, local or any fsspec URL (``file://``, ``http(s)://``, ``s3://``...):
  an official ConvMAE ``.pth`` (pretraining or fine-tuned ConvViT; key names are mapped) or a
  state dict under our names (``.pth``/``.pt``/``.safetensors``). Files are read with
  ``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled.
  A remote folder (``s3://.../checkpoint_000003``) is downloaded first;
- ``random:PRESET`` or ``random:PRESET:IMG_SIZE``: a freshly initialised model (seeded), the
  baseline that shows what pretraining added. With the pretraining seed it is exactly the
  starting point of a pretraining run.

Checkpoint files and DeepSpeed folders carry no config, so the preset is found by matching
the weights' shapes against ``convmae.PRESETS`` at the image size of their position embedding
(official checkpoints are ``convmae_base`` at 224); pass ``preset`` when several would match.
A state dict with decoder weights becomes a pretraining ``ConvMAE``; one without (a fine-tuned
or backbone-only checkpoint) a ``ConvMAEBackbone``, with its classifier head if it has one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from convmae import (
    PRETRAINING_MODELS,
    ConvMAEBackbone,
    MAEConfig,
    ModelConfig,
    build_model_from_config,
)
from service.config import redact_url
from service.data.scratch import scratch
from service.runtime.engine import ENGINE_STATE_DIR, consolidated_state_dict, has_engine_state

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
MLFLOW_PREFIXES = ("models:/", "runs:/")


class ModelSourceError(ValueError):
    """A ``--model`` value that cannot be loaded; the message names it and what was expected."""


@dataclass
class ModelSource:
    """A loaded model and where it came from."""

    model: nn.Module  # ConvMAE or MAE (has a decoder) or ConvMAEBackbone, on CPU, eval mode
    uri: str  # the source as given
    kind: str  # "mlflow" | "pretrained_dir" | "deepspeed" | "official" | "state_dict" | "random"
    run_id: str | None = None  # the MLflow run that produced the model, if any
    tracking_uri: str | None = None
    preset: str | None = None  # the matched preset, where the config had to be inferred

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def is_pretraining_model(self) -> bool:
        """True when it has the MAE decoder (reconstruction loss, reconstruction images)."""
        return isinstance(self.model, PRETRAINING_MODELS)

    def describe(self) -> str:
        arch = type(self.model).__name__
        dims = [self.config.embed_dim] if isinstance(self.config, MAEConfig) else list(self.config.embed_dims)
        size = f"img_size {self.config.img_size}, dims {dims}"
        run = f", MLflow run {self.run_id}" if self.run_id else ""
        return f"{redact_url(self.uri)} ({self.kind}: {arch}, {size}{run})"


def load_model_source(
    uri: str,
    *,
    tracking_uri: str | None = None,
    preset: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelSource:
    """Resolves ``uri`` (see module docstring) into a model in eval mode on the CPU.

    ``preset`` picks the preset for checkpoints without a config (default: inferred from the
    shapes). ``img_size`` and ``seed`` apply to ``random:`` models only. ``storage_options``
    are passed to fsspec for ``s3://`` URLs (see ``service.data.storage_options``).
    """
    uri = (uri or "").strip()
    if not uri:
        raise ModelSourceError("no model given: pass --model models:/NAME@ALIAS, a checkpoint path or URL, "
                               "or random:PRESET")
    if uri.startswith(RANDOM_PREFIX):
        source = _random_model(uri, img_size=img_size, seed=seed)
    elif uri.startswith(MLFLOW_PREFIXES):
        source = _from_mlflow(uri, tracking_uri)
    else:
        source = _from_path_or_url(uri, preset=preset, storage_options=storage_options)
    source.model.eval()
    # Every job that loads one says which in its own output (evaluate's table, reconstruct's and
    # fine-tuning's lines); at INFO here it printed twice.
    log.debug("model: %s", source.describe())
    return source


# ---------------------------------------------------------------- random baselines


def _random_model(uri: str, *, img_size: int | None, seed: int) -> ModelSource:
    from convmae import PRESETS, build_model

    spec = uri[len(RANDOM_PREFIX) :]
    name, _, size = spec.partition(":")
    if name not in PRESETS:
        raise ModelSourceError(f"--model {uri!r}: unknown preset {name!r}; use random:PRESET[:IMG_SIZE] "
                               f"with PRESET one of {', '.join(sorted(PRESETS))}")
    if size:
        if not size.isdigit():
            raise ModelSourceError(f"--model {uri!r}: image size {size!r} is not a whole number")
        img_size = int(size)
    overrides = {"img_size": img_size} if img_size else {}
    torch.manual_seed(seed)  # as the pretraining workers do before building the model
    try:
        model = build_model(name, **overrides)
    except ValueError as exc:
        raise ModelSourceError(f"--model {uri!r}: {exc}") from None
    return ModelSource(model=model, uri=uri, kind="random", preset=name)


# ---------------------------------------------------------------- MLflow


def _from_mlflow(uri: str, tracking_uri: str | None) -> ModelSource:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from service.tracking import resolve_tracking_uri
    from service.tracking.registry import download_model_dir

    # Explicit URIs only: mlflow.set_tracking_uri would also rewrite MLFLOW_TRACKING_URI for
    # this process and everything it starts.
    tracking_uri = resolve_tracking_uri(tracking_uri or "")
    try:
        run_id = mlflow_run_id(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), uri)
        with scratch("model") as tmp:
            model = _load_pretrained(download_model_dir(uri, tmp, tracking_uri=tracking_uri), uri)
    except MlflowException as exc:
        raise ModelSourceError(f"--model {uri!r}: MLflow at {tracking_uri} cannot provide it: "
                               f"{str(exc).splitlines()[0]}") from None
    except FileNotFoundError as exc:
        raise ModelSourceError(f"--model {uri!r}: {exc}") from None
    return ModelSource(model=model, uri=uri, kind="mlflow", run_id=run_id, tracking_uri=tracking_uri)


def mlflow_run_id(client: Any, uri: str) -> str | None:
    """The run that logged the model behind a ``models:/`` or ``runs:/`` URI."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0] or None
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    found = get_model_name_and_version(client, uri)
    if len(found) == 1:  # models:/m-ID, a logged model
        return client.get_logged_model(found[0]).source_run_id
    name, version = found
    return client.get_model_version(name, version).run_id


# ---------------------------------------------------------------- files, folders and URLs


def _from_path_or_url(uri: str, *, preset: str | None, storage_options: Mapping[str, Any] | None) -> ModelSource:
    import fsspec

    from convmae.checkpoint import read_checkpoint

    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = dict(storage_options or {}) if protocol in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
        is_dir = fs.isdir(path)
        exists = is_dir or fs.isfile(path)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelSourceError(f"--model {uri!r}: cannot open it ({type(exc).__name__}: {exc})") from None
    if not exists:
        raise ModelSourceError(
            f"--model {uri!r}: no such file or folder. Expected models:/NAME/VERSION, models:/NAME@ALIAS, "
            "runs:/RUN_ID/model, a save_pretrained or checkpoint folder, a checkpoint file or URL, "
            "or random:PRESET[:IMG_SIZE]"
        )
    if is_dir:
        if protocol == "file":
            return _from_folder(Path(path), uri, preset)
        with scratch("model") as tmp:
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            return _from_folder(Path(tmp), uri, preset)
    with fs.open(path, "rb") as f:
        payload = f.read()  # whole file: torch.load and safetensors need random access
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            checkpoint: dict[str, Any] = load_safetensors(payload)
        else:
            checkpoint = read_checkpoint(io.BytesIO(payload))
    except Exception as exc:  # not a checkpoint, or pickled objects we refuse to load
        raise ModelSourceError(f"--model {uri!r}: not a loadable checkpoint: {exc}") from None
    return from_state_dict(checkpoint, uri=uri, preset=preset)


def _load_pretrained(folder: str | Path, uri: str) -> nn.Module:
    """``convmae.load_pretrained``, whose config.json is checked (sizes within
    ``convmae.configs.LIMITS``) before any weight is allocated; a bad one is a ModelSourceError."""
    from convmae import CheckpointMismatchError, load_pretrained

    try:
        return load_pretrained(folder)
    except CheckpointMismatchError:
        raise
    except ValueError as exc:  # malformed JSON, unknown fields, sizes out of bounds
        raise ModelSourceError(f"--model {uri!r}: {exc}") from None


def _from_folder(folder: Path, uri: str, preset: str | None) -> ModelSource:
    from convmae.checkpoint import CONFIG_FILE

    if (folder / CONFIG_FILE).exists():
        return ModelSource(model=_load_pretrained(folder, uri), uri=uri, kind="pretrained_dir")
    if has_engine_state(folder):
        source = from_state_dict(consolidated_state_dict(folder, label=uri), uri=uri, preset=preset)
        source.kind = "deepspeed"
        return source
    raise ModelSourceError(f"--model {uri!r}: the folder holds neither a save_pretrained model "
                           f"({CONFIG_FILE}) nor a DeepSpeed checkpoint ({ENGINE_STATE_DIR}/)")


def from_state_dict(checkpoint: Mapping[str, Any], *, uri: str = "<state_dict>",
                    preset: str | None = None) -> ModelSource:
    """A model from a checkpoint dict (official or ours), its config inferred from the shapes."""
    from convmae.checkpoint import convert_official_state_dict, extract_state_dict, looks_official

    try:
        state = extract_state_dict(checkpoint)
    except ValueError as exc:
        raise ModelSourceError(f"--model {uri!r}: {exc}") from None
    official = looks_official(state)
    ours, unknown = convert_official_state_dict(state) if official else (state, [])
    if unknown:
        raise ModelSourceError(f"--model {uri!r}: official-looking checkpoint with unknown keys "
                               f"{sorted(unknown)[:10]}")
    cfg, name = infer_config(ours, preset=preset, uri=uri)
    if "decoder.pred.weight" in ours:
        model: nn.Module = build_model_from_config(cfg)
        _load_exactly(model, ours, uri)
    elif isinstance(cfg, MAEConfig):
        raise ModelSourceError(f"--model {uri!r}: weights of the plain-ViT MAE baseline ({name}) without its "
                               "decoder; only its whole pretraining model can be loaded")
    else:
        head = ours.get("head.weight")
        global_pool = "fc_norm.weight" in ours or "encoder_norm.weight" not in ours
        model = ConvMAEBackbone(cfg, num_classes=int(head.shape[0]) if head is not None else 0,
                                global_pool=global_pool)
        model.load_pretrain_state_dict(ours)
    return ModelSource(model=model, uri=uri, kind="official" if official else "state_dict", preset=name)


def _load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], uri: str) -> None:
    from convmae.checkpoint import CheckpointMismatchError, compare_keys

    diff = compare_keys(model.state_dict(), state)
    if not diff.ok:
        raise CheckpointMismatchError(f"--model {uri!r} does not fit {type(model).__name__}",
                                      diff.missing, diff.unexpected, diff.mismatched)
    model.load_state_dict(state, strict=True)


def infer_config(state: Mapping[str, torch.Tensor], *, preset: str | None = None,
                 uri: str = "<state_dict>") -> tuple[ModelConfig, str]:
    """The preset (at the image size of the position embedding) whose shapes ``state`` has.

    ``state`` uses our key names. Only the keys the checkpoint has are compared, and every
    encoder key of the preset must be there; the decoder must match too when present.
    """
    from convmae import PRESETS, get_config

    pos = state.get("encoder.pos_embed")
    if pos is None or pos.ndim != 3:
        raise ModelSourceError(f"--model {uri!r}: no encoder position embedding (encoder.pos_embed / "
                               "official pos_embed); not a ConvMAE checkpoint")
    grid = round(pos.shape[1] ** 0.5)
    if grid * grid != pos.shape[1]:
        raise ModelSourceError(f"--model {uri!r}: position embedding of {pos.shape[1]} tokens is not a square grid")
    names = [preset] if preset else list(PRESETS)
    if preset and preset not in PRESETS:
        raise ModelSourceError(f"preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    has_decoder = "decoder.pred.weight" in state
    for name in names:
        cfg = get_config(name)
        cfg = cfg.replace(img_size=grid * cfg.patch_size)
        with torch.device("meta"):  # shapes only: no memory, no init cost even for huge
            reference = build_model_from_config(cfg).state_dict()
        wanted = {k: v for k, v in reference.items() if k.startswith("encoder.") or (has_decoder and
                  k.startswith(("decoder.", "fuse_stage", "encoder_norm.")))}
        if all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in wanted.items()):
            return cfg, name
    shapes = {k: tuple(state[k].shape) for k in ("encoder.stage1_embed.proj.weight", "encoder.pos_embed")
              if k in state}
    raise ModelSourceError(
        f"--model {uri!r}: its weights match {'preset ' + repr(preset) if preset else 'no preset'} "
        f"({', '.join(names)}); shapes {shapes}. Pass the right preset (model_preset) or check the file"
    )
