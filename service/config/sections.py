"""The sections job configs are made of; each is a frozen dataclass with its defaults."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# data.decode: where training JPEGs are decoded (see service/data/gpu_decode.py).
DECODE_MODES = ("cpu", "gpu", "auto")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convmae_tiny"  # a preset of convmae.PRESETS
    # 96 px: a 6x6 token grid, 9 visible at the paper's 75% mask. Measured on the embedded
    # digits (README, Quick start): at 32 px (2x2 tokens, one visible) pretraining lowered
    # k-NN below the random start; at 64 px (4 visible) reconstructions stayed noise longer.
    img_size: int = 96
    mask_ratio: float = 0.75  # fraction of the H/16 token grid masked in pretraining (block-wise)
    norm_pix_loss: bool = True  # reconstruct each patch's normalised pixels (the paper's loss)


@dataclass(frozen=True)
class StorageConfig:
    """Where outputs live and how to reach object storage; one section serves data, checkpoints,
    models and sweeps (``service.config.locations``).

    Credentials are never config: they come from the standard AWS_* environment variables or
    botocore's chain (profile files, instance or pod roles), so no secret is logged with it.
    """

    # Persistent root of every relative output location (runs, sweeps, the MLflow store, the
    # embedded data): a path or s3:// URL. Empty: CONVMAE_HOME, else the working directory.
    root: str = ""
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (MinIO...)
    region: str | None = None  # None: AWS_REGION, else AWS_DEFAULT_REGION
    anon: bool = False  # read public buckets without credentials
    max_retries: int = 5  # transient errors are retried with backoff this many times
    # On a cluster of several nodes a local path (checkpoints, data, the MLflow store) is refused
    # unless it is a shared mount: true says it is (NFS, a FUSE-mounted bucket...).
    shared_local_paths: bool = False


@dataclass(frozen=True)
class DataConfig:
    # Any fsspec URL of a prepared shard data set (s3://bucket/prefix, file://, local path,
    # memory://). Empty: the embedded data set, generated locally on first use.
    url: str = ""
    # Held-out split for validation reconstruction loss / k-NN. Empty: the embedded val split
    # when url is empty, else no validation.
    val_url: str = ""
    loader_workers: int = 2  # loader processes decoding images for each training worker; 0: in the worker itself
    shuffle_buffer: int = 512  # samples each loader mixes in its streaming shuffle buffer (more: better mixing, more memory)
    min_crop_scale: float = 0.2  # smallest area fraction of the random resized crop
    hflip: bool = True  # flip training images horizontally at random
    # Where the embedded data set is generated (relative to the working directory).
    embedded_dir: str = "convmae_data"
    # Images with more pixels (by their header) are skipped and counted, never decoded: one
    # 13000x13000 PNG would take 0.5 GB in a loader worker. 8192 x 8192 by default.
    max_image_pixels: int = 8192 * 8192
    # Where training images are decoded: cpu (DataLoader workers, PIL); gpu (JPEGs batched on
    # the training process's GPU with nvJPEG, torchvision needed; processes without CUDA keep
    # the CPU path); auto (gpu where CUDA and torchvision are there, else cpu).
    decode: str = "cpu"


@dataclass(frozen=True)
class OptimConfig:
    """The ``train.*`` keys of the optimizer, schedule and loop that every training job has."""

    epochs: int = 2  # passes over the training data
    batch_size_per_worker: int = 32  # images per worker per micro-step; effective batch = this x workers x grad_accum_steps
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # floor of the cosine lr schedule
    warmup_epochs: float = 1.0  # epochs of linear lr warm-up (fractions allowed)
    weight_decay: float = 0.05  # AdamW weight decay (none on norms, biases, position embeddings, mask tokens)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's betas
    grad_accum_steps: int = 1  # micro-batches whose gradients are summed into one optimizer step
    clip_grad: float | None = None  # clip the global gradient norm at this value; null: no clipping
    seed: int = 0  # seed of the initial weights, masks, shuffling and augmentation (a resumed run draws the same)
    max_steps: int | None = None  # stop early after this many optimizer steps (tests, smoke runs)
    log_every_steps: int = 10  # log training metrics (console and MLflow) every this many optimizer steps
    val_every_epochs: int = 1  # validate every this many epochs
    profile_steps: int = 0  # rank 0 writes a torch.profiler trace of this many steps (an MLflow artifact)


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """Pretraining: MAE's recipe plus the validation metrics that compare runs.

    The defaults are the zero-flag run's on the embedded digits (tiny preset, one CPU worker,
    about three minutes), picked by measurement (README, Quick start): lr 1e-3 at batch 32;
    jobs/configs/convmae_base_in1k.yaml has the paper's recipe.
    """

    epochs: int = 12
    blr: float = 8e-3  # lr = blr * effective_batch / 256: 1e-3 at the default batch of 32
    warmup_epochs: float = 2.0
    eval_mask_ratio: float = 0.75  # fixed ratio for the comparable validation loss
    knn_k: int = 20  # k of the k-NN validation metric on labeled data; 0 turns it off
    knn_train_samples: int = 20_000  # size of the k-NN feature bank drawn from the train split
    eval_before_training: bool = True  # score the starting weights too (val/* at step 0, at the first validation)


@dataclass(frozen=True)
class FinetuneTrainConfig(OptimConfig):
    # Paper recipe (ConvMAE-B on ImageNet: 100 epochs, 5 warmup) scaled to a short CPU run;
    # jobs/configs/finetune_base_in1k.yaml has the full recipe.
    epochs: int = 10
    blr: float = 5e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65  # lr of layer l is scaled by layer_decay ** (num_layers - l)
    mixup: float = 0.8  # Mixup alpha; 0 turns it off
    cutmix: float = 1.0  # CutMix alpha; 0 turns it off
    mixup_prob: float = 1.0  # probability that a batch is mixed
    mixup_switch_prob: float = 0.5  # CutMix instead of Mixup, when both are on
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy loss
    eval_before_training: bool = True  # score the fresh classifier first (val/top1 at step 0)


@dataclass(frozen=True)
class DistributedConfig:
    num_workers: int = 1  # Ray Train workers, one process each (and one GPU each with GPUs)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker (its loader processes run within them)
    gpus_per_worker: float = 1.0  # GPUs Ray reserves for each worker when it uses GPUs
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0 replicates everything; 1 shards optimizer states, 2 also gradients, 3 also weights
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool | None = None  # torch.compile the model; None: on with GPUs (CPU compiles take minutes)
    offload_optimizer: bool = False  # keep ZeRO's optimizer states in CPU memory (ZeRO 1-3)
    max_failures: int = 0  # worker failures the run recovers from (from its last checkpoint) before it fails
    # How long a run waits for the cluster to have room for all its workers (CPUs, GPUs) before
    # it fails naming what it asked for and what the nodes have; a request the cluster can never
    # meet (a worker bigger than any node of a cluster that cannot grow) is refused at once.
    placement_timeout_s: float = 300.0
    # Elastic runs: with fewer than num_workers placeable (a node lost, not yet back), go on with
    # as few as this many; the run grows back to num_workers when capacity returns. None: a fixed
    # size (num_workers), waiting for all of them. The global batch stays that of num_workers:
    # gradient accumulation takes up what absent workers leave.
    min_workers: int | None = None
    # How often a running elastic run looks for room to grow (seconds).
    resize_check_s: float = 60.0
    # None: join RAY_ADDRESS if set, else start a new local cluster on 127.0.0.1 (never one
    # merely found running on the machine); "local" forces the latter.
    ray_address: str | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    storage_path: str = "convmae_runs"  # local dir or s3://bucket/prefix
    every_steps: int = 50  # save a checkpoint every this many optimizer steps
    keep_last: int = 2  # checkpoints kept in the run's folder; older ones are deleted
    resume: bool = True  # continue from the latest checkpoint of the same run name
    # Upload checkpoints from a background thread while training goes on (one at a time);
    # false: training waits for each upload.
    background_upload: bool = True
    # One writer per run: a run's lease (service.training.lease) whose holder stopped renewing
    # it for this long is taken over by the next run of that name (at once when the holder's
    # process is seen gone on the same machine).
    lease_timeout_s: float = 300.0


@dataclass(frozen=True)
class MLflowConfig:
    enabled: bool = True  # track the job in MLflow; false: no tracking and nothing registered
    tracking_uri: str = ""  # empty: sqlite:///mlruns.db in the working directory
    experiment: str = "convmae-pretrain"  # the MLflow experiment runs are logged under
    # The model registry name the trained model is registered as; empty: named after what it
    # holds, PRESET-SIZEpx-DATA (convmae_tiny-96px-digits for the zero-flag run), so that models
    # of other presets, sizes or data sets never become versions of one another.
    registered_model_name: str = ""
    register: bool = True  # register the final model in the MLflow model registry
    recon_every_epochs: int = 1  # log a reconstruction grid every this many epochs
    system_metrics: bool = True  # log CPU, GPU and memory use with the run
