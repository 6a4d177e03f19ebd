"""Shared data for the data-layer tests: the embedded digits (generated once per session) and
small image folders written on the fly."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import DataConfig, StorageConfig
from service.data.embedded import ensure_digits
from service.data.loader import close_worker_pool


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    ensure_digits(root)
    return root


@pytest.fixture(scope="session")
def digits_train(embedded_dir: Path) -> str:
    return str(embedded_dir / "digits" / "train")


@pytest.fixture(scope="session")
def digits_val(embedded_dir: Path) -> str:
    return str(embedded_dir / "digits" / "val")


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    """A small image whose pixels depend on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Writes ``classes`` x ``per_class`` images (ImageNet layout), or flat with classes=0."""

    def make(classes: int = 3, per_class: int = 10, name: str = "images",
             fmt: str = "JPEG", ext: str = "JPEG") -> Path:
        root = tmp_path / name
        n = 0
        for c in range(max(classes, 1)):
            folder = root / f"class_{c}" if classes else root
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"img_{c}_{i}.{ext}").write_bytes(image_bytes(n, fmt=fmt))
                n += 1
        return root

    return make


def config(**overrides) -> DataConfig:
    """A DataConfig for tests: no workers unless asked, small shuffle window."""
    values = {"loader_workers": 0, "shuffle_buffer": 64}
    values.update(overrides)
    return DataConfig(**values)


def storage(**overrides) -> StorageConfig:
    """A StorageConfig for tests: few retries."""
    values = {"max_retries": 2}
    values.update(overrides)
    return StorageConfig(**values)


@pytest.fixture(autouse=True)
def no_lingering_loader_workers():
    """Persistent training workers outlive their loaders by design; not past a test."""
    yield
    close_worker_pool()
