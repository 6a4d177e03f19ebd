"""Every job's config: a frozen dataclass tree with its own ``validate``.

Training jobs (pretraining, fine-tuning, and the trials of a sweep) share ``TrainingJobConfig``:
run name, data, storage, the ``train`` optimizer keys, ``dist``, ``checkpoint`` and ``mlflow``,
with the batch and lr arithmetic. The downstream jobs (evaluate, reconstruct) name a model
source instead. Validation fails fast, before Ray starts, with the bad key, its value and what
is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from convmae.configs import LIMITS
from service.config.schema import ConfigError, check
from service.config.sections import (
    DECODE_MODES,
    PRECISIONS,
    ZERO_STAGES,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    FinetuneTrainConfig,
    MLflowConfig,
    ModelConfig,
    OptimConfig,
    StorageConfig,
    TrainConfig,
)

# Parts of a data URL that name a split or layout rather than the data set.
_GENERIC_DATA_PARTS = {"train", "training", "shards", "data", "images", "val", "validation"}


def pretrained_model_name(model: ModelConfig, data_url: str) -> str:
    """The registry name of a pretrained model that says what it holds: preset, image size and
    data set (``convmae_tiny-96px-digits``; ``s3://bucket/imagenet/train`` gives ``imagenet``)."""
    if not data_url:
        data = "digits"  # the embedded data set
    else:
        parts = [p for p in data_url.split("://")[-1].split("/") if p and p.lower() not in _GENERIC_DATA_PARTS]
        data = re.sub(r"[^A-Za-z0-9_.-]+", "-", parts[-1] if parts else "").strip("-.") or "data"
    return f"{model.name}-{model.img_size}px-{data}"


# What `python jobs/pretrain.py` registers by default, in the default local MLflow store.
DEFAULT_MODEL = f"models:/{pretrained_model_name(ModelConfig(), '')}/latest"
RECONSTRUCT_SPLITS = ("val", "train")
RECONSTRUCT_STATS = ("visible", "target")  # convmae.reconstruct's
# The image sizes the model takes (convmae.configs.LIMITS): larger ones would allocate position
# embeddings and attention no machine holds.
IMG_SIZE_LIMITS = LIMITS["img_size"]


@dataclass(frozen=True)
class TrainingJobConfig:
    """What every job that trains on Ray Train workers has."""

    run_name: str = "convmae-run"  # the run's checkpoint folder and MLflow run name; the same name resumes it
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    @property
    def effective_batch_size(self) -> int:
        return self.train.batch_size_per_worker * self.dist.num_workers * self.train.grad_accum_steps

    def at_world_size(self, workers: int) -> TrainingJobConfig:
        """This config as ``workers`` workers run it: the global batch of ``dist.num_workers``
        workers kept, gradient accumulation taking up what absent workers leave (an elastic run
        that lost nodes). Validation made the division exact for every allowed size."""
        if workers == self.dist.num_workers:
            return self
        import dataclasses

        micro_per_step = self.dist.num_workers * self.train.grad_accum_steps
        return dataclasses.replace(
            self, train=dataclasses.replace(self.train, grad_accum_steps=micro_per_step // workers),
            dist=dataclasses.replace(self.dist, num_workers=workers))

    @property
    def learning_rate(self) -> float:
        """``train.lr``, else MAE's rule ``train.blr * effective_batch / 256``."""
        if self.train.lr is not None:
            return self.train.lr
        return self.train.blr * self.effective_batch_size / 256


@dataclass(frozen=True)
class PretrainConfig(TrainingJobConfig):
    run_name: str = "convmae-pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> PretrainConfig:
        validate_pretrain(self)
        return self

    def registered_name(self) -> str:
        """``mlflow.registered_model_name``, or the name that says what the model holds."""
        return self.mlflow.registered_model_name or pretrained_model_name(self.model, self.data.url)


@dataclass(frozen=True)
class FinetuneConfig(TrainingJobConfig):
    run_name: str = "convmae-finetune"
    # The pretrained model: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model, a
    # save_pretrained or checkpoint folder, a checkpoint file or URL (official ConvMAE .pth
    # too), or random:PRESET[:IMG_SIZE] (training from scratch, as a baseline).
    model: str = DEFAULT_MODEL
    model_preset: str = ""  # preset of a config-less checkpoint; empty: inferred from its shapes
    img_size: int = 0  # 0: the pretrained model's (position embeddings are interpolated otherwise)
    num_classes: int = 0  # 0: the training data's number of classes
    drop_path: float = 0.1  # stochastic depth rate of the fine-tuned encoder
    global_pool: bool = True  # classify the mean of the tokens (the paper's setting)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    mlflow: MLflowConfig = field(default_factory=lambda: MLflowConfig(
        experiment="convmae-finetune", registered_model_name="convmae-classifier"))

    def validate(self) -> FinetuneConfig:
        validate_finetune(self)
        return self


@dataclass(frozen=True)
class EvaluateConfig:
    # models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model, a save_pretrained or checkpoint
    # folder, a checkpoint file or URL (official ConvMAE .pth too), or random:PRESET[:IMG_SIZE].
    model: str = DEFAULT_MODEL
    model_preset: str = ""  # preset of a config-less checkpoint; empty: inferred from its shapes
    img_size: int = 0  # random: models only (0: the preset's); others use their own
    seed: int = 0  # initialisation seed of random: models (0 = the pretraining's default start)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 64  # images per forward pass
    knn_k: int = 20  # 0 turns k-NN off
    knn_temperature: float = 0.07  # temperature of the k-NN's similarity-weighted vote
    train_samples: int = 20_000  # features drawn from the train split (k-NN bank, probe fit)
    linear_probe: bool = True  # also fit a linear classifier on the frozen features
    probe_weight_decay: float = 1e-4  # L2 strength of the linear probe
    probe_max_iter: int = 500  # iterations of the probe's solver
    mask_ratio: float = 0.75  # fixed ratio of the reconstruction loss
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else ./mlruns.db
    log_to_run: bool = True  # log the metrics on the model's MLflow run (models:/, runs:/)
    output: str = ""  # also write the results as JSON to this path

    def validate(self) -> EvaluateConfig:
        validate_model_source_keys(self)
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.knn_k >= 0, "knn_k", self.knn_k, ">= 0 (0 turns k-NN off)")
        check(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "> 0")
        check(self.train_samples >= 1, "train_samples", self.train_samples, ">= 1")
        check(self.probe_weight_decay >= 0, "probe_weight_decay", self.probe_weight_decay, ">= 0")
        check(self.probe_max_iter >= 1, "probe_max_iter", self.probe_max_iter, ">= 1")
        check_seed("seed", self.seed)
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "0 < mask_ratio < 1")
        check(self.data.loader_workers >= 0, "data.loader_workers", self.data.loader_workers, ">= 0")
        validate_max_pixels(self.data)
        validate_storage(self.storage)
        return self


@dataclass(frozen=True)
class ReconstructConfig:
    # A pretraining model (it needs the decoder): models:/..., runs:/..., a folder, a checkpoint
    # file or URL (official ConvMAE pretraining .pth too), or random:PRESET[:IMG_SIZE].
    model: str = DEFAULT_MODEL
    model_preset: str = ""  # preset of a config-less checkpoint; empty: inferred from its shapes
    img_size: int = 0  # random: models only (0: the preset's)
    images: int = 8  # how many rows
    out: str = "reconstructions.png"  # the PNG written
    mask_ratio: float = 0.75  # fraction of tokens masked
    seed: int = 0  # the masks (and a random: model's weights)
    scale: int = 4  # nearest-neighbour upscaling of the whole grid (small images stay visible)
    # How masked patches are drawn from a norm_pix_loss model's output: visible (with the
    # statistics of the image's visible patches: only what the model made is shown) or target
    # (with each masked patch's own, as MAE's demos: its brightness comes from the image).
    stats: str = "visible"
    split: str = "val"  # which split of the data set: val (data.val_url) or train (data.url)
    inputs: str = ""  # comma-separated image files or URLs to use instead of the data set
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else ./mlruns.db
    log_to_run: bool = False  # also log the PNG on the model's MLflow run (models:/, runs:/)

    def validate(self) -> ReconstructConfig:
        validate_model_source_keys(self)
        check(1 <= self.images <= 256, "images", self.images, "1..256")
        check(bool(self.out) and self.out.lower().endswith(".png"), "out", self.out, "a path ending in .png")
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "0 < mask_ratio < 1")
        check(1 <= self.scale <= 32, "scale", self.scale, "1..32")
        check_seed("seed", self.seed)
        check(self.split in RECONSTRUCT_SPLITS, "split", self.split, f"one of {', '.join(RECONSTRUCT_SPLITS)}")
        check(self.stats in RECONSTRUCT_STATS, "stats", self.stats, f"one of {', '.join(RECONSTRUCT_STATS)}")
        validate_max_pixels(self.data)
        validate_storage(self.storage)
        return self


@dataclass(frozen=True)
class PrepareClusterConfig:
    """The ``dist`` keys of data preparation: where its Ray cluster is."""

    # None: join RAY_ADDRESS if set, else start a local cluster on 127.0.0.1; "local" forces
    # the latter (as the training jobs' dist.ray_address). Used when workers is not 1.
    ray_address: str | None = None


@dataclass(frozen=True)
class PrepareDataConfig:
    src: str = ""  # an image folder (class/xxx.jpg: labeled, or flat) or one archive, any fsspec URL
    dest: str = ""  # where the shards and manifest.json go (s3://bucket/prefix, a path...)
    shard_size: str = "256MB"  # target shard size: 256MB, 1.5GB, 64KB or a number of bytes
    samples_per_shard: int | None = None  # also close a shard after this many images
    shuffle_seed: int | None = 0  # order in which images are written; null keeps the source order
    overwrite: bool = False  # replace a data set already at dest instead of resuming
    # Store images at most this size: one whose shorter side exceeds it is scaled down (aspect
    # kept) to that shorter side and re-encoded in its format; null stores every image as is.
    max_side: int | None = None
    # Untrusted sources: an image file or archive member larger than this is skipped and
    # counted (64MB; an ImageNet JPEG is ~110KB), so is a zip member that would expand more
    # than max_expansion_ratio times (a zip bomb), and a tar nested deeper than max_nesting.
    max_image_bytes: str = "64MB"
    max_expansion_ratio: float = 100.0  # a zip member expanding more than this many times is skipped
    max_nesting: int = 8  # tars inside tars are read this many levels deep; deeper ones are skipped
    # Processes that pack at once, as Ray tasks over ranges of the source: 1 packs in this
    # process (no Ray); 0 or auto: one per CPU of the cluster (dist.ray_address). Resume with
    # the same number: the ranges depend on it.
    workers: str = "1"
    # Images held out as a validation split at <dest>/val (chosen by a hash of each image's
    # name: the same split on every run and any workers); training jobs use it when
    # data.val_url is empty. 0: no split; at most 0.5.
    val_fraction: float = 0.05
    storage: StorageConfig = field(default_factory=StorageConfig)
    dist: PrepareClusterConfig = field(default_factory=PrepareClusterConfig)

    @property
    def num_workers(self) -> int | None:
        """``workers`` as a count; None: the cluster's CPUs."""
        text = str(self.workers).strip().lower()
        return None if text in ("auto", "0") else int(text)

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    @property
    def image_bytes_limit(self) -> int:
        return parse_size(self.max_image_bytes)

    def validate(self) -> PrepareDataConfig:
        check(bool(self.src), "src", self.src, "an image folder or archive (path or URL)")
        check(bool(self.dest), "dest", self.dest, "a destination path or URL")
        try:
            check(self.shard_bytes > 0, "shard_size", self.shard_size, "> 0")
        except ValueError as exc:
            raise ConfigError(f"shard_size={self.shard_size!r} is not allowed: {exc}") from None
        check(self.samples_per_shard is None or self.samples_per_shard >= 1, "samples_per_shard",
              self.samples_per_shard, ">= 1 or null")
        check(self.max_side is None or self.max_side >= 16, "max_side", self.max_side,
              ">= 16 pixels (e.g. 512), or null to store images as they are")
        try:
            check(self.image_bytes_limit >= 1, "max_image_bytes", self.max_image_bytes, ">= 1 byte (e.g. 64MB)")
        except ValueError as exc:
            raise ConfigError(f"max_image_bytes={self.max_image_bytes!r} is not allowed: {exc}") from None
        check(self.max_expansion_ratio >= 1, "max_expansion_ratio", self.max_expansion_ratio, ">= 1 (e.g. 100)")
        check(self.max_nesting >= 0, "max_nesting", self.max_nesting, ">= 0 (0: no tar read inside a tar)")
        check(0 <= self.val_fraction <= 0.5, "val_fraction", self.val_fraction,
              "from 0 (no validation split) to 0.5, e.g. 0.05")
        allowed_workers = "a number of processes >= 1, or 0 / auto for the cluster's CPUs"
        try:
            check(self.num_workers is None or self.num_workers >= 1, "workers", self.workers, allowed_workers)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"workers={self.workers!r} is not allowed: {allowed_workers}") from None
        validate_storage(self.storage)
        return self


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
               "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """``256MB`` -> 268435456. Units are powers of 1024 (KB = KiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("use e.g. 256MB, 1.5GB, 64KB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


# ---------------------------------------------------------------- validation


def validate_pretrain(cfg: PretrainConfig) -> None:
    from convmae import PRESETS  # the model package owns the preset names

    m, t = cfg.model, cfg.train
    check(m.name in PRESETS, "model.name", m.name, f"one of {', '.join(sorted(PRESETS))}")
    # At 0 every patch is visible and nothing is left to reconstruct: the loss is 0 from the
    # first step and the run learns nothing.
    check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "0 < mask_ratio < 1")
    check(0.0 < t.eval_mask_ratio < 1.0, "train.eval_mask_ratio", t.eval_mask_ratio, "0 < ratio < 1")
    if m.name in PRESETS:
        patch = PRESETS[m.name]().patch_size
        low, high = patch, IMG_SIZE_LIMITS[1] // patch * patch
        check(low <= m.img_size <= high and m.img_size % patch == 0, "model.img_size", m.img_size,
              f"a multiple of {patch} (the patch size of {m.name}) in {low}..{high}")
        # The encoder must see at least one patch: int(L * (1 - ratio)) >= 1.
        patches = (m.img_size // patch) ** 2
        for key, ratio in (("model.mask_ratio", m.mask_ratio), ("train.eval_mask_ratio", t.eval_mask_ratio)):
            check(int(patches * (1.0 - ratio)) >= 1, key, ratio,
                  f"at most {(patches - 1) / patches:g} at model.img_size={m.img_size} ({patches} patches of "
                  f"{patch}x{patch}; the encoder must see one)")
    check(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", cfg.data.shuffle_buffer, ">= 1")
    check(t.knn_k >= 0, "train.knn_k", t.knn_k, ">= 0 (0 turns k-NN off)")
    check(t.knn_train_samples >= 1, "train.knn_train_samples", t.knn_train_samples, ">= 1")
    check(cfg.mlflow.recon_every_epochs >= 1, "mlflow.recon_every_epochs", cfg.mlflow.recon_every_epochs, ">= 1")
    validate_training_job(cfg)


def validate_finetune(cfg: FinetuneConfig) -> None:
    t = cfg.train
    validate_model_source_keys(cfg)
    check(cfg.num_classes >= 0, "num_classes", cfg.num_classes, ">= 0 (0: from the data)")
    check(0.0 <= cfg.drop_path < 1.0, "drop_path", cfg.drop_path, "0 <= drop_path < 1")
    check(0.0 < t.layer_decay <= 1.0, "train.layer_decay", t.layer_decay, "0 < layer_decay <= 1 (1: off)")
    check(t.mixup >= 0, "train.mixup", t.mixup, ">= 0 (0 turns Mixup off)")
    check(t.cutmix >= 0, "train.cutmix", t.cutmix, ">= 0 (0 turns CutMix off)")
    check(0.0 <= t.mixup_prob <= 1.0, "train.mixup_prob", t.mixup_prob, "0 <= p <= 1")
    check(0.0 <= t.mixup_switch_prob <= 1.0, "train.mixup_switch_prob", t.mixup_switch_prob, "0 <= p <= 1")
    check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "0 <= s < 1")
    validate_training_job(cfg)


def validate_training_job(cfg: TrainingJobConfig) -> None:
    """The keys every training job shares: data loading, storage, ``train.*``, run and workers."""
    d = cfg.data
    check(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, ">= 0")
    check(0.0 < d.min_crop_scale <= 1.0, "data.min_crop_scale", d.min_crop_scale, "0 < scale <= 1")
    check(d.decode in DECODE_MODES, "data.decode", d.decode, f"one of {', '.join(DECODE_MODES)}")
    validate_max_pixels(d)
    validate_storage(cfg.storage)
    validate_optimization(cfg.train)
    validate_run(cfg)


def validate_max_pixels(d: DataConfig) -> None:
    check(d.max_image_pixels >= 1, "data.max_image_pixels", d.max_image_pixels, ">= 1 (e.g. 67108864 = 8192 x 8192)")


def validate_storage(s: StorageConfig) -> None:
    check(s.max_retries >= 0, "storage.max_retries", s.max_retries, ">= 0")


def validate_optimization(t: OptimConfig) -> None:
    check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    check(t.batch_size_per_worker >= 1, "train.batch_size_per_worker", t.batch_size_per_worker, ">= 1")
    check(t.blr > 0, "train.blr", t.blr, "> 0")
    check(t.lr is None or t.lr > 0, "train.lr", t.lr, "> 0 or null")
    check(t.min_lr >= 0, "train.min_lr", t.min_lr, ">= 0")
    check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, ">= 0")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    check(all(0.0 <= b < 1.0 for b in t.betas), "train.betas", t.betas, "two values in [0, 1)")
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, ">= 1")
    check(t.clip_grad is None or t.clip_grad > 0, "train.clip_grad", t.clip_grad, "> 0 or null")
    check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1 or null")
    check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, ">= 1")
    check(t.val_every_epochs >= 1, "train.val_every_epochs", t.val_every_epochs, ">= 1")
    check(t.profile_steps >= 0, "train.profile_steps", t.profile_steps, ">= 0 (0: no trace)")
    check_seed("train.seed", t.seed)


def validate_run(cfg: TrainingJobConfig) -> None:
    """``run_name``, ``dist.*`` and ``checkpoint.*``: how and where a training job runs."""
    g, c = cfg.dist, cfg.checkpoint
    check(g.num_workers >= 1, "dist.num_workers", g.num_workers, ">= 1")
    check(g.cpus_per_worker > 0, "dist.cpus_per_worker", g.cpus_per_worker, "> 0")
    check(g.gpus_per_worker > 0, "dist.gpus_per_worker", g.gpus_per_worker, "> 0")
    check(g.zero_stage in ZERO_STAGES, "dist.zero_stage", g.zero_stage, f"one of {ZERO_STAGES}")
    check(g.precision in PRECISIONS, "dist.precision", g.precision, f"one of {PRECISIONS}")
    check(g.max_failures >= -1, "dist.max_failures", g.max_failures, ">= 0, or -1 for unlimited")
    check(g.placement_timeout_s > 0, "dist.placement_timeout_s", g.placement_timeout_s, "> 0 seconds")
    validate_elastic(cfg)
    if g.use_gpu is False:
        check(g.precision in ("auto", "fp32"), "dist.precision", g.precision,
              "fp32 (or auto) when dist.use_gpu is false: CPU training runs in fp32")
    check(g.offload_optimizer is False or g.zero_stage >= 1, "dist.offload_optimizer",
          g.offload_optimizer, "true only with dist.zero_stage >= 1")
    check(c.every_steps >= 1, "checkpoint.every_steps", c.every_steps, ">= 1")
    check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, ">= 1")
    check(c.lease_timeout_s >= 10, "checkpoint.lease_timeout_s", c.lease_timeout_s,
          ">= 10 (seconds; it is renewed every fifth of it)")
    check(bool(c.storage_path), "checkpoint.storage_path", c.storage_path, "a local path or URL")
    check_path_component("run_name", cfg.run_name, RUN_NAME_MAX)


def validate_elastic(cfg: TrainingJobConfig) -> None:
    """``dist.min_workers``: at most ``dist.num_workers``, and every size in between must split
    the global batch's micro-batches evenly (the global batch does not change with the size)."""
    g = cfg.dist
    check(g.resize_check_s >= 0, "dist.resize_check_s", g.resize_check_s, ">= 0 (seconds)")
    if g.min_workers is None:
        return
    check(1 <= g.min_workers <= g.num_workers, "dist.min_workers", g.min_workers,
          f"1 to dist.num_workers={g.num_workers}, or null for a fixed size")
    sizes = range(g.min_workers, g.num_workers + 1)
    micro_per_step = g.num_workers * cfg.train.grad_accum_steps
    uneven = [w for w in sizes if micro_per_step % w]
    if uneven:
        fits = next(a for a in range(1, math.lcm(*sizes) + 1) if all(g.num_workers * a % w == 0 for w in sizes))
        raise ConfigError(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps} is not allowed with dist.num_workers="
            f"{g.num_workers} and dist.min_workers={g.min_workers}: a step's {micro_per_step} micro-batches "
            f"cannot be split evenly over {uneven[0]} workers; set train.grad_accum_steps to a multiple of "
            f"{fits}, or raise dist.min_workers")


# A run's checkpoints live under checkpoint.storage_path/run_name, its sweep's under
# sweep.storage_path/sweep.name; a sweep's trials are runs named <sweep.name>-<trial id>, so a
# sweep name leaves room for the trial id.
RUN_NAME_MAX = 128
SWEEP_NAME_MAX = RUN_NAME_MAX - 32
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_path_component(key: str, value: str, max_length: int) -> None:
    """``value`` names one folder under a storage path: a single component that cannot climb
    out of it ('..'), hide (a leading '.') or need quoting in a URL."""
    check(bool(_PATH_COMPONENT.fullmatch(value)) and len(value) <= max_length, key, value,
          f"a single path component of at most {max_length} characters from A-Z a-z 0-9 . _ -, "
          "starting with a letter or digit")


def validate_model_source_keys(cfg: Any) -> None:
    """A downstream job's ``model``, ``model_preset`` and ``img_size`` keys."""
    from convmae import PRESETS

    check(bool(cfg.model.strip()), "model", cfg.model, "a model URI, path, URL or random:PRESET[:IMG_SIZE]")
    check(not cfg.model_preset or cfg.model_preset in PRESETS, "model_preset", cfg.model_preset,
          f"empty or one of {', '.join(sorted(PRESETS))}")
    high = IMG_SIZE_LIMITS[1] // 16 * 16
    check(cfg.img_size == 0 or (16 <= cfg.img_size <= high and cfg.img_size % 16 == 0), "img_size", cfg.img_size,
          f"0 (the model's own) or a multiple of 16 in 16..{high}")


# torch.manual_seed takes 64-bit seeds; the largest signed one leaves room for the per-rank
# offsets the workers add (fine-tuning seeds rank r with seed + 1 + r).
MAX_TORCH_SEED = 2**63 - 1
# numpy's RandomState (Tune's random and grid searchers, Optuna's TPE) takes 32-bit seeds.
MAX_NUMPY_SEED = 2**32 - 1


def check_seed(key: str, value: int, high: int = MAX_TORCH_SEED) -> None:
    check(0 <= value <= high, key, value, f"a whole number in 0..{high} (2**{high.bit_length()} - 1)")
