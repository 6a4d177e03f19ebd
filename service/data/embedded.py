"""The embedded data set: scikit-learn's bundled handwritten digits as a prepared shard set.

1797 real 8x8 digit scans (no download) are rendered to RGB PNGs, split 90/10 stratified by
label with a fixed seed, and written as ``<embedded_dir>/digits/{train,val}``. Generation
happens once: it writes to a private temporary directory and renames it into place, so
processes racing on first use all end up reading one complete copy.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from service.config import DataConfig, StorageConfig
from service.data.errors import DataError
from service.data.manifest import MANIFEST_NAME, Manifest, validation_url
from service.data.sources import MemorySource
from service.data.storage import (
    describe_error,
    filesystem,
    is_storage_error,
    redact_url,
    storage_options,
)

log = logging.getLogger(__name__)

NAME = "digits"
IMAGE_SIZE = 32
VAL_FRACTION = 0.1
SPLIT_SEED = 0
# Small shards, so that a few ranks x workers each get whole shards of this tiny set.
SAMPLES_PER_SHARD = 128
SPLITS = ("train", "val")


def resolve_data_urls(cfg: DataConfig, storage: StorageConfig | None = None) -> tuple[str, str | None]:
    """(train URL, val URL or None): ``cfg.url``/``cfg.val_url``, or the embedded digits
    (generated on first use) when ``cfg.url`` is empty. With ``cfg.val_url`` empty, the
    validation split ``jobs/prepare_data.py`` held out at ``<cfg.url>/val`` when it has a
    manifest (looked for with ``storage``), logged."""
    if cfg.url:
        return cfg.url, cfg.val_url or held_out_split(cfg.url, storage)
    # Absolute, so the URLs stay valid in processes with another working directory.
    root = ensure_digits(Path(cfg.embedded_dir)).resolve()
    return str(root / "train"), cfg.val_url or str(root / "val")


def held_out_split(url: str, storage: StorageConfig | None = None) -> str | None:
    """``<url>/val`` when a prepared data set is there (the split ``jobs/prepare_data.py``
    holds out), else None. Storage that cannot be asked is left to opening ``url`` to report."""
    val_url = validation_url(url)
    fs, root = filesystem(val_url, storage_options(storage))
    try:
        found = fs.exists(posixpath.join(root, MANIFEST_NAME))
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        log.warning("cannot look for a validation split at %s (%s): no validation",
                    redact_url(val_url), describe_error(exc))
        return None
    if found:
        log.info("data.val_url is empty: validating on %s, the split held out when %s was prepared",
                 redact_url(val_url), redact_url(url))
        return val_url
    return None


def ensure_digits(embedded_dir: Path) -> Path:
    """``embedded_dir/digits`` with complete train and val splits, generated if missing."""
    final = embedded_dir / NAME
    if _complete(final):
        return final
    if final.exists():
        raise DataError(f"{final} exists but is not a complete embedded data set (missing or "
                        f"unreadable {MANIFEST_NAME}); delete it to have it generated again")
    embedded_dir.mkdir(parents=True, exist_ok=True)
    tmp = embedded_dir / f".{NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_digits(tmp)
        try:
            os.rename(tmp, final)
            log.info("generated the embedded data set at %s", final)
        except OSError:
            if not _complete(final):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(root: Path) -> bool:
    try:
        for split in SPLITS:
            Manifest.from_json((root / split / MANIFEST_NAME).read_bytes(), str(root / split))
    except (OSError, DataError):
        return False
    return True


def digit_images(size: int = IMAGE_SIZE) -> tuple[list[bytes], np.ndarray]:
    """Every digit as RGB PNG bytes (white on black, ``size`` x ``size``) and its label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pngs = []
    for pixels in digits.images:  # 8x8 floats, 0..16
        gray = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8))
        img = gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=VAL_FRACTION,
                                  stratify=labels, random_state=SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val)}


def _write_digits(root: Path) -> None:
    from service.data.prepare import write_dataset

    pngs, labels = digit_images()
    classes = [str(d) for d in range(10)]
    for split, indices in split_indices(labels).items():
        items = [(f"digit_{i:04d}", "png", pngs[i], int(labels[i])) for i in indices]
        source = MemorySource(f"sklearn.datasets.load_digits ({split})", items, classes)
        write_dataset(source, str(root / split), samples_per_shard=SAMPLES_PER_SHARD,
                      extra={"image_size": IMAGE_SIZE, "split_seed": SPLIT_SEED})
