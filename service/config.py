"""Typed configuration for the training service.

One tree of frozen dataclasses describes a whole run. It is loaded from YAML, overridden
from the command line with dotted keys (``--train.lr 1e-4``), validated before any cluster
work starts, and flattened to ``section.key`` params for MLflow. Tune search spaces use the
same dotted keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convmae_tiny"  # a preset of convmae.PRESETS
    img_size: int = 32
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


@dataclass(frozen=True)
class DataConfig:
    # Any fsspec URL of a prepared shard data set (s3://bucket/prefix, file://, local path,
    # memory://). Empty: the embedded data set, generated locally on first use.
    url: str = ""
    # Held-out split for validation reconstruction loss / k-NN. Empty: the embedded val split
    # when url is empty, else no validation.
    val_url: str = ""
    loader_workers: int = 2
    shuffle_buffer: int = 512
    min_crop_scale: float = 0.2
    hflip: bool = True
    # Object storage: None falls back to the standard AWS_* environment variables.
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    max_retries: int = 5
    # Where the embedded data set is generated (relative to the working directory).
    embedded_dir: str = "convmae_data"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size_per_worker: int = 32
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum_steps: int = 1
    clip_grad: float | None = None
    seed: int = 0
    max_steps: int | None = None  # stop early after this many optimizer steps (tests, smoke runs)
    log_every_steps: int = 10
    val_every_epochs: int = 1
    eval_mask_ratio: float = 0.75  # fixed ratio for the comparable validation loss
    knn_k: int = 20  # k of the k-NN validation metric on labeled data; 0 turns it off
    knn_train_samples: int = 20_000  # size of the k-NN feature bank drawn from the train split


@dataclass(frozen=True)
class DistributedConfig:
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    max_failures: int = 0
    ray_address: str | None = None  # None: connect to RAY_ADDRESS or start a local cluster


@dataclass(frozen=True)
class CheckpointConfig:
    storage_path: str = "convmae_runs"  # local dir or s3://bucket/prefix
    every_steps: int = 50
    keep_last: int = 2
    resume: bool = True  # continue from the latest checkpoint of the same run name


@dataclass(frozen=True)
class MLflowConfig:
    enabled: bool = True
    tracking_uri: str = ""  # empty: sqlite:///mlruns.db in the working directory
    experiment: str = "convmae-pretrain"
    registered_model_name: str = "convmae"
    register: bool = True
    recon_every_epochs: int = 1
    system_metrics: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    run_name: str = "convmae-pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def validate(self) -> PretrainConfig:
        validate_pretrain(self)
        return self

    @property
    def effective_batch_size(self) -> int:
        return self.train.batch_size_per_worker * self.dist.num_workers * self.train.grad_accum_steps

    @property
    def learning_rate(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return self.train.blr * self.effective_batch_size / 256


C = TypeVar("C")


# ---------------------------------------------------------------- building from dicts


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Converts a YAML or CLI value to the field's type, or raises ConfigError naming it."""
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {_type_name(tp)})")
    tp = inner
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if typing.get_origin(tp) is dict:
            # Dotted keys may arrive flat ({"train.blr": ...}) or nested by CLI overrides
            # ({"train": {"blr": ...}}); both mean the same entry.
            if not isinstance(value, Mapping):
                raise ValueError
            _, value_type = typing.get_args(tp)
            return {k: _coerce(f"{key}.{k}", v, value_type) for k, v in _flat_items(value, "")}
        if typing.get_origin(tp) is tuple:
            item_types = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            value = list(value)
            if len(value) != len(item_types):
                raise ValueError
            return tuple(_coerce(key, v, t) for v, t in zip(value, item_types))
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _flat_items(tree: Mapping[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat_items(v, f"{prefix}{k}.")
        else:
            yield prefix + str(k), v


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Builds a config dataclass from a nested mapping; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _resolved_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} at {where}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """``{'train.lr': 1e-4, ...}``: the dotted keys used by the CLI, Tune and MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(config), "")
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def with_overrides(config: C, overrides: Mapping[str, Any]) -> C:
    """A copy of ``config`` with dotted-key overrides applied and types checked."""
    tree = to_dict(config)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return from_dict(type(config), tree)


def parse_cli_overrides(args: Iterable[str]) -> dict[str, Any]:
    """``['--train.lr', '1e-4', '--dist.use_gpu=false']`` -> ``{'train.lr': '1e-4', ...}``.

    Values stay strings (or YAML scalars) and are typed by ``from_dict``; YAML parsing lets
    ``--train.betas [0.9,0.95]`` and ``--train.clip_grad null`` work.
    """
    args = list(args)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            raw = args[i]
        key = key.replace("-", "_")
        out[key] = _yaml_scalar(raw)
        i += 1
    return out


def _yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def load_config(
    cls: type[C] = PretrainConfig,  # type: ignore[assignment]
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Defaults <- YAML file <- overrides, then validation (if the class has ``validate``)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    config = from_dict(cls, tree)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Fails fast, before Ray starts, with the bad key, its value and what is allowed."""
    from convmae import PRESETS  # the model package owns the preset names

    m, d, t = cfg.model, cfg.data, cfg.train
    _check(m.name in PRESETS, "model.name", m.name, f"one of {', '.join(sorted(PRESETS))}")
    _check(m.img_size >= 16 and m.img_size % 16 == 0, "model.img_size", m.img_size, "a positive multiple of 16")
    _check(0.0 <= m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "0 <= mask_ratio < 1")
    _check(0.0 < t.eval_mask_ratio < 1.0, "train.eval_mask_ratio", t.eval_mask_ratio, "0 < ratio < 1")
    if m.img_size >= 16 and m.img_size % 16 == 0:
        # The encoder must see at least one 16x16 patch: int(L * (1 - ratio)) >= 1.
        patches = (m.img_size // 16) ** 2
        for key, ratio in (("model.mask_ratio", m.mask_ratio), ("train.eval_mask_ratio", t.eval_mask_ratio)):
            _check(int(patches * (1.0 - ratio)) >= 1, key, ratio,
                   f"at most {(patches - 1) / patches:g} at model.img_size={m.img_size} ({patches} patches of "
                   "16x16; the encoder must see one)")
    validate_data_loading(d)
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, ">= 1")
    _check(d.max_retries >= 0, "data.max_retries", d.max_retries, ">= 0")
    validate_optimization(t)
    _check(t.knn_k >= 0, "train.knn_k", t.knn_k, ">= 0 (0 turns k-NN off)")
    _check(t.knn_train_samples >= 1, "train.knn_train_samples", t.knn_train_samples, ">= 1")
    validate_run(cfg)
    _check(cfg.mlflow.recon_every_epochs >= 1, "mlflow.recon_every_epochs",
           cfg.mlflow.recon_every_epochs, ">= 1")


# Checks shared by every job that trains on Ray Train workers (pretraining, fine-tuning).


def validate_data_loading(d: DataConfig) -> None:
    _check(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, ">= 0")
    _check(0.0 < d.min_crop_scale <= 1.0, "data.min_crop_scale", d.min_crop_scale, "0 < scale <= 1")


def validate_optimization(t: Any) -> None:
    """The ``train.*`` keys of the optimizer, schedule and loop that every training job has."""
    _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    _check(t.batch_size_per_worker >= 1, "train.batch_size_per_worker", t.batch_size_per_worker, ">= 1")
    _check(t.blr > 0, "train.blr", t.blr, "> 0")
    _check(t.lr is None or t.lr > 0, "train.lr", t.lr, "> 0 or null")
    _check(t.min_lr >= 0, "train.min_lr", t.min_lr, ">= 0")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, ">= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(all(0.0 <= b < 1.0 for b in t.betas), "train.betas", t.betas, "two values in [0, 1)")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, ">= 1")
    _check(t.clip_grad is None or t.clip_grad > 0, "train.clip_grad", t.clip_grad, "> 0 or null")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1 or null")
    _check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, ">= 1")
    _check(t.val_every_epochs >= 1, "train.val_every_epochs", t.val_every_epochs, ">= 1")


def validate_run(cfg: Any) -> None:
    """``run_name``, ``dist.*`` and ``checkpoint.*``: how and where a training job runs."""
    g, c = cfg.dist, cfg.checkpoint
    _check(g.num_workers >= 1, "dist.num_workers", g.num_workers, ">= 1")
    _check(g.cpus_per_worker > 0, "dist.cpus_per_worker", g.cpus_per_worker, "> 0")
    _check(g.gpus_per_worker > 0, "dist.gpus_per_worker", g.gpus_per_worker, "> 0")
    _check(g.zero_stage in ZERO_STAGES, "dist.zero_stage", g.zero_stage, f"one of {ZERO_STAGES}")
    _check(g.precision in PRECISIONS, "dist.precision", g.precision, f"one of {PRECISIONS}")
    _check(g.max_failures >= -1, "dist.max_failures", g.max_failures, ">= 0, or -1 for unlimited")
    if g.use_gpu is False:
        _check(g.precision in ("auto", "fp32"), "dist.precision", g.precision,
               "fp32 (or auto) when dist.use_gpu is false: CPU training runs in fp32")
    _check(g.offload_optimizer is False or g.zero_stage >= 1, "dist.offload_optimizer",
           g.offload_optimizer, "true only with dist.zero_stage >= 1")
    _check(c.every_steps >= 1, "checkpoint.every_steps", c.every_steps, ">= 1")
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, ">= 1")
    _check(bool(c.storage_path), "checkpoint.storage_path", c.storage_path, "a local path or URL")
    _check(bool(cfg.run_name) and "/" not in cfg.run_name, "run_name", cfg.run_name,
           "a non-empty name without '/'")
