"""The evaluation reconstruction loss: one fixed mask per sample, whatever the batching."""

import dataclasses

import pytest
import torch

from convmae import build_model
from service.config import DataConfig
from service.data import build_eval_loader
from service.evaluation.metrics import reconstruction_loss, sample_masks

IMG = 64  # a 4x4 token grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("convmae_tiny", img_size=IMG).eval()


def batches_of(images: torch.Tensor, keys: list[str], sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for size in sizes:
        out.append({"images": images[start : start + size], "keys": keys[start : start + size]})
        start += size
    return out


def loss_of(model, batches) -> float:
    return reconstruction_loss(model, batches, mask_ratio=0.75, img_size=IMG, device=torch.device("cpu"),
                               dtype=torch.float32)


def test_a_samples_mask_follows_its_key_not_its_place_in_the_batch(model):
    images = torch.randn(3, 3, IMG, IMG)
    masks = sample_masks(model, images, ["a", "b", "c"], 0.75).mask
    swapped = sample_masks(model, images[[2, 0, 1]], ["c", "a", "b"], 0.75).mask
    assert torch.equal(swapped, masks[[2, 0, 1]])
    assert masks.sum(dim=1).tolist() == [12.0, 12.0, 12.0]  # 75% of the 4x4 token grid
    assert not torch.equal(masks[0], masks[1])  # seeded per key, not one mask for all


@torch.no_grad()
def test_the_loss_does_not_depend_on_batch_sizes_or_order(model):
    torch.manual_seed(1)
    images = torch.randn(10, 3, IMG, IMG)
    keys = [f"{i:06d}" for i in range(10)]
    whole = loss_of(model, batches_of(images, keys, [10]))
    assert loss_of(model, batches_of(images, keys, [4, 4, 2])) == pytest.approx(whole, rel=1e-6)
    order = torch.randperm(10).tolist()
    shuffled = batches_of(images[order], [keys[i] for i in order], [3, 3, 3, 1])
    assert loss_of(model, shuffled) == pytest.approx(whole, rel=1e-6)
    # The masks are the keys': other keys on the same images give another figure.
    assert loss_of(model, batches_of(images, [f"x{k}" for k in keys], [10])) != pytest.approx(whole, rel=1e-4)


@torch.no_grad()
def test_loader_workers_give_the_same_loss_as_loading_in_process(model, digits_dir):
    val_url = str(digits_dir / "digits" / "val")
    losses = [
        loss_of(model, build_eval_loader(val_url, dataclasses.replace(DataConfig(), loader_workers=workers),
                                         img_size=IMG, batch_size=16))
        for workers in (0, 2)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
