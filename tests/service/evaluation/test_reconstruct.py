"""The driver of jobs/reconstruct.py: which images it reads, what it writes, what it refuses."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

import convmae
from service.config import ConfigError, DataConfig, ReconstructConfig
from service.evaluation.reconstruct import load_images, run_reconstruct
from service.models.source import ModelSourceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation every loader applies
IMAGENET_STD = (0.229, 0.224, 0.225)


def solid(path, colour, size=(50, 40)) -> str:
    Image.new("RGB", size, colour).save(path)
    return path.as_uri()


def test_own_images_are_read_up_to_the_row_count_and_normalised(tmp_path):
    colours = [(255, 0, 0), (0, 128, 255), (10, 10, 10)]
    urls = [solid(tmp_path / f"in{i}.png", c) for i, c in enumerate(colours)]
    images = load_images(ReconstructConfig(inputs=" , ".join(urls), images=2), img_size=32)
    assert images.shape == (2, 3, 32, 32)  # images=2 rows: the third is not read
    for image, colour in zip(images, colours):
        expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
        assert image.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-4)
        assert float(image.std(dim=(1, 2)).max()) < 1e-4  # a solid colour stays solid


def test_an_unreadable_or_too_large_input_is_refused_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = (tmp_path / "broken.png").as_uri()
    with pytest.raises(ConfigError, match=rf"^inputs: cannot read image '{broken}': "):
        load_images(ReconstructConfig(inputs=broken), img_size=32)
    big = solid(tmp_path / "big.png", (1, 2, 3), size=(200, 200))
    with pytest.raises(ConfigError, match=r"^inputs: cannot read image .*big.png': 200x200 is 40000 pixels, over "
                                          r"data.max_image_pixels=1000"):
        load_images(ReconstructConfig(inputs=big, data=DataConfig(max_image_pixels=1000)), img_size=32)


def test_the_data_sets_first_images_of_the_split_are_used(digits_dir):
    data = DataConfig(embedded_dir=str(digits_dir), loader_workers=0)
    val = load_images(ReconstructConfig(images=3, data=data), img_size=32)
    again = load_images(ReconstructConfig(images=3, data=data), img_size=32)
    train = load_images(ReconstructConfig(images=3, data=data, split="train"), img_size=32)
    assert val.shape == train.shape == (3, 3, 32, 32)
    assert torch.equal(val, again) and not torch.equal(val, train)


def test_the_val_split_of_a_data_set_without_one_is_refused(digits_dir):
    data = DataConfig(url=str(digits_dir / "digits" / "train"), val_url="", loader_workers=0)
    with pytest.raises(ConfigError, match=r"^split=val but the data set has no validation split \(no <data.url>/val\): "
                                          "set data.val_url or split=train$"):
        load_images(ReconstructConfig(data=data), img_size=32)


def test_a_grid_is_written_deterministically_for_a_seed(digits_dir, tmp_path):
    def run(name: str, seed: int) -> tuple[object, bytes]:
        cfg = ReconstructConfig(model="random:convmae_tiny:32", images=2, out=str(tmp_path / name), seed=seed,
                                scale=1, data=DataConfig(embedded_dir=str(digits_dir), loader_workers=0))
        result = run_reconstruct(cfg)
        return result, (tmp_path / name).read_bytes()

    result, first = run("a.png", seed=0)
    assert result.path == tmp_path / "a.png" and result.images == 2 and result.run_id is None
    assert result.size == Image.open(tmp_path / "a.png").size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)
    assert "random" in result.model
    _, same = run("b.png", seed=0)
    _, other = run("c.png", seed=1)  # other masks and other random weights
    assert hashlib.sha256(first).digest() == hashlib.sha256(same).digest()
    assert first != other


def test_a_model_without_a_decoder_is_refused(tmp_path):
    folder = convmae.save_pretrained(convmae.ConvMAEBackbone(convmae.get_config("convmae_tiny", img_size=32)),
                                     tmp_path / "backbone")
    cfg = ReconstructConfig(model=str(folder), out=str(tmp_path / "x.png"))
    with pytest.raises(ModelSourceError, match="has no decoder .*reconstructions need a pretraining model"):
        run_reconstruct(cfg)
    assert not (tmp_path / "x.png").exists()
