"""Data layer: WebDataset-style shards on any fsspec storage, read as fast as training eats.

Interface the training loop codes against
-----------------------------------------
``storage_options(cfg: StorageConfig | None) -> StorageOptions``
    s3fs kwargs (endpoint_url, region, credentials, retries) from ``cfg``, falling back to
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS_REGION / AWS_DEFAULT_REGION /
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN). A dict whose repr masks
    secrets: safe to log.

``open_dataset(url, storage: StorageConfig | None) -> ShardDataset``
    Reads and checks ``url/manifest.json`` and the shard listing up front; raises
    ``DataError`` (a ValueError) naming the URL and the problem: unknown protocol, missing
    bucket or prefix, no manifest (incomplete or unprepared data set), malformed manifest,
    missing shards. Exposes ``num_samples``, ``num_shards``, ``has_labels``, ``num_classes``,
    ``class_names``.

``resolve_data_urls(cfg, storage=None) -> (train_url, val_url | None)``
    ``cfg.url`` / ``cfg.val_url``; when ``cfg.url`` is empty, the embedded digits set
    (``<cfg.embedded_dir>/digits/{train,val}``, generated once, race-safe). With ``cfg.val_url``
    empty, ``<cfg.url>/val`` when a prepared data set is there (the split
    ``jobs/prepare_data.py`` holds out, ``val_fraction``).

``build_train_loader(cfg, *, storage=None, img_size, batch_size, rank, world_size, seed, epoch,
resume_state=None) -> TrainLoader``
    One epoch of one rank. Iterating yields batches
    ``{"images": FloatTensor (B, 3, img_size, img_size) ImageNet-normalised,
    "labels": LongTensor (B,) (-1 when unlabeled), "keys": list[str]}``.
    ``len(loader)`` is the number of batches of the whole epoch and is identical on every
    rank: ``N // world_size // batch_size`` for a data set of N samples. Each epoch lays the
    shards out in a (seed, epoch)-shuffled order; rank r reads the contiguous block
    ``[r*U, (r+1)*U)`` of it (``U = len(loader) * batch_size``) and the last
    ``N - world_size*U`` samples of that order are dropped for the epoch; since the order is
    reshuffled every epoch, a different remainder is dropped each time. Within a rank,
    DataLoader workers read contiguous runs of shards and shuffle in windows of
    ``cfg.shuffle_buffer`` samples; crops and flips are seeded per batch.
    ``loader.state_dict()`` is a small JSON-able position (epoch, batches consumed, and the
    settings that must match); a loader built with ``resume_state=`` that dict yields exactly
    the remaining batches of the epoch, identical in content. The state is rank-independent
    (rank 0's state resumes every rank); resuming with a different world size, batch size,
    seed, epoch, shuffle buffer or loader_workers count raises DataError.
    ``loader.corrupt_samples`` counts undecodable images and those whose header announces more
    than ``cfg.max_image_pixels`` pixels (never decoded); each is logged at WARNING with its
    key and why. To keep batch shapes fixed, a skipped image's slot is filled with a decodable
    image of the same batch (or a mean-colour image labelled -1 if none is).
    ``cfg.loader_workers`` DataLoader worker processes (0: in-process), pinned memory only
    when CUDA is available. The workers persist: the loaders of consecutive epochs (same
    settings) share them, and they prepare the next epoch's first batches while the current
    one ends, so an epoch starts without waiting (``close_worker_pool()`` stops them; a
    loader with other settings replaces them). Ranks are passed in, never looked up.
    Shards read whole are checked against the manifest's sha256 as they stream; a mismatch
    raises DataError naming the shard.

``build_eval_loader(url, cfg, *, storage=None, img_size, batch_size, rank=0, world_size=1) -> EvalLoader``
    Same batch dicts, no augmentation (resize + center crop), fixed order, every sample
    exactly once across ranks (rank r gets N*r//world_size .. N*(r+1)//world_size - 1; the
    last batch may be short). Undecodable images are left out of their batch.

``transforms``: ``train_transform(img_size, min_scale=0.2, hflip=True)``,
``eval_transform(img_size)`` (PIL.Image -> normalised FloatTensor (3, H, W); ``.geometry``
gives the uint8 crop), ``resized_crop`` (the torch crop/resize/flip, any device),
``IMAGENET_MEAN``, ``IMAGENET_STD``.

``prepare.prepare_dataset(src, dest, *, shard_bytes=256 MiB, storage_options=None, ...)``
    Packs an image folder (``class/xxx.jpg`` or flat) or archive into shards plus
    ``manifest.json`` (written last); re-running resumes; ``max_side=N`` stores images whose
    shorter side exceeds N scaled down to N; ``val_fraction=F`` holds out a validation split
    (a hash of each image's key) as its own data set at ``<dest>/val``. CLI: ``jobs/prepare_data.py``
    (F=0.05 by default there).

``cfg.decode`` (cpu|gpu|auto): in a CUDA process, gpu/auto decode the training JPEGs on the
GPU (``gpu_decode``; ``build_train_loader(..., device=)``), with the CPU path's crops.

Modules: storage (options, filesystems, retries), manifest, shards (tar format, checksummed
reads), dataset (open + read with retries), sharding (epoch plans), transforms, gpu_decode
(nvJPEG), streams (worker-side batches), loader (persistent worker pool), sources + prepare
(writing), embedded (digits).
"""

from service.data import transforms
from service.data.dataset import ShardDataset, open_dataset
from service.data.embedded import resolve_data_urls
from service.data.errors import DataError
from service.data.loader import (
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    close_worker_pool,
)
from service.data.storage import StorageOptions, storage_options
from service.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DataError",
    "EvalLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShardDataset",
    "StorageOptions",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "close_worker_pool",
    "open_dataset",
    "resolve_data_urls",
    "storage_options",
    "transforms",
]
