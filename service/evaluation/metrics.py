"""Comparable evaluation of a pretraining model.

Training loss is not comparable across mask ratios (a higher ratio reconstructs more patches),
so sweeps and the evaluate job compare:
- ``val/recon_loss``: reconstruction loss on a held-out split at one fixed mask ratio, with
  fixed masks, each sample's seeded by its key;
- ``val/knn_top1``: k-NN top-1 accuracy of the encoder's pooled features (labeled data only).

Fine-tuned classifiers are scored with ``classification_metrics`` (top-1 and cross-entropy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from convmae import BlockMask
from service.runtime.worker import all_gather_tensors, all_reduce_max, all_reduce_sum

EVAL_MASK_SEED = 20_220_503  # fixed masks: the same for every trial and every evaluation


# ---------------------------------------------------------------- k-NN


def knn_predict(
    train_features: torch.Tensor,  # (N, C)
    train_labels: torch.Tensor,  # (N,)
    query_features: torch.Tensor,  # (M, C)
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (the protocol of InstDisc/DINO); returns (M,) labels."""
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one labeled training feature")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    preds = []
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # (m, k)
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_features, train_labels, query_features, query_labels, num_classes, k=20, temperature=0.07) -> float:
    preds = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return float((preds == query_labels).float().mean())


# ---------------------------------------------------------------- lockstep iteration


def lockstep(batches: Iterable[dict], device: torch.device) -> Iterator[dict | None]:
    """Yields batches until every worker is exhausted; exhausted workers get ``None``.

    Workers may hold different numbers of evaluation batches, but under ZeRO-3 every forward
    is a collective, so all workers must run the same number of them.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        if all_reduce_max(int(batch is not None), device) == 0:
            return
        yield batch


def _dummy_like(img_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, 3, img_size, img_size, device=device, dtype=dtype)


@torch.no_grad()
def reconstruction_loss(
    module: torch.nn.Module,
    batches: Iterable[dict],
    *,
    mask_ratio: float,
    img_size: int,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
) -> float:
    """Mean loss over all workers' samples, each under its own fixed mask (``sample_masks``), so
    the figure does not depend on how the samples were batched: loader workers, world size and
    batch size give the same loss."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in lockstep(batches, device):
        if batch is None:
            module(_dummy_like(img_size, device, dtype), mask_ratio=mask_ratio,
                   generator=torch.Generator().manual_seed(EVAL_MASK_SEED + rank))
            continue
        images = batch["images"].to(device, dtype=dtype)
        masks = sample_masks(module, images, batch["keys"], mask_ratio)
        loss, _, _ = module(images, block_mask=masks)
        total += torch.tensor([float(loss) * images.shape[0], images.shape[0]], dtype=torch.float64, device=device)
    total = all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def sample_masks(module: torch.nn.Module, images: torch.Tensor, keys: Sequence[str], mask_ratio: float) -> BlockMask:
    """The evaluation masks of a batch: each sample's drawn from a generator seeded by its key.

    Every sample hides the same number of tokens, so the batch loss (a mean over masked patches)
    times the batch size is the sum of per-sample losses, whichever samples share the batch.
    """
    masks = [module.random_mask(images[i : i + 1], mask_ratio, torch.Generator().manual_seed(mask_seed(key)))
             for i, key in enumerate(keys)]
    return BlockMask(
        ids_keep=torch.cat([m.ids_keep for m in masks]),  # (B, K)
        ids_restore=torch.cat([m.ids_restore for m in masks]),  # (B, L)
        mask=torch.cat([m.mask for m in masks]),  # (B, L)
        grid=masks[0].grid,
    )


def mask_seed(key: str) -> int:
    """A sample's evaluation-mask seed: a stable hash of its key (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(f"{EVAL_MASK_SEED}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes up to 2**63 - 1


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    *,
    img_size: int,
    device: torch.device,
    dtype: torch.dtype,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of all workers' samples, gathered on every worker."""
    feats, labels, seen = [], [], 0
    for batch in lockstep(batches, device):
        if batch is None or (limit is not None and seen >= limit):
            embed(_dummy_like(img_size, device, dtype))
            continue
        images = batch["images"].to(device, dtype=dtype)
        feats.append(embed(images).float())
        labels.append(batch["labels"].to(device))
        seen += images.shape[0]
    width = feats[0].shape[1] if feats else 0
    f = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    width = all_reduce_max(f.shape[1], device)
    if f.shape[1] != width:  # a worker with no samples: give its empty tensor the right width
        f = torch.zeros(0, width, device=device)
    return all_gather_tensors(f).cpu(), all_gather_tensors(y).cpu()


@torch.no_grad()
def classification_metrics(
    module: torch.nn.Module,
    batches: Iterable[dict],
    *,
    img_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a classifier over all workers' samples.

    A collective (lockstep forwards, every worker calls it); placeholder labels (-1) are skipped.
    """
    total = torch.zeros(3, dtype=torch.float64, device=device)  # (correct, loss sum, count)
    for batch in lockstep(batches, device):
        if batch is None:
            module(_dummy_like(img_size, device, dtype))
            continue
        labels = batch["labels"].to(device)
        logits = module(batch["images"].to(device, dtype=dtype)).float()
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
        total += torch.stack([
            (logits.argmax(dim=1) == labels).sum().double(),
            F.cross_entropy(logits, labels, reduction="sum").double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
    total = all_reduce_sum(total)
    if total[2] == 0:
        return {"top1": float("nan"), "loss": float("nan")}
    return {"top1": float(total[0] / total[2]), "loss": float(total[1] / total[2])}


def pooled_embedding(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's pooled features of unmasked images (what the downstream backbone sees)."""
    from convmae import encoder_embedding

    return lambda images: encoder_embedding(module, images)


def validate_during_training(
    module: torch.nn.Module, cfg: Any, val_url: str, train_url: str, ctx: Any, dtype: torch.dtype
) -> dict[str, float]:
    """Validation metrics at an epoch end; a collective, every worker calls it."""
    from service import data as data_lib

    was_training = module.training
    module.eval()
    img_size, bs = cfg.model.img_size, cfg.train.batch_size_per_worker
    metrics: dict[str, float] = {}
    try:
        val_batches = data_lib.build_eval_loader(
            val_url, cfg.data, storage=cfg.storage, img_size=img_size, batch_size=bs, rank=ctx.rank, world_size=ctx.world_size
        )
        metrics["val/recon_loss"] = reconstruction_loss(
            module, val_batches, mask_ratio=cfg.train.eval_mask_ratio, img_size=img_size,
            device=ctx.device, dtype=dtype, rank=ctx.rank,
        )
        if cfg.train.knn_k > 0 and data_lib.open_dataset(val_url, cfg.storage).has_labels:
            embed = pooled_embedding(module)
            common = dict(img_size=img_size, device=ctx.device, dtype=dtype)
            train_batches = data_lib.build_eval_loader(
                train_url, cfg.data, storage=cfg.storage, img_size=img_size, batch_size=bs, rank=ctx.rank, world_size=ctx.world_size
            )
            per_worker = -(-cfg.train.knn_train_samples // ctx.world_size)
            bank, bank_labels = extract_features(embed, train_batches, limit=per_worker, **common)
            val_batches = data_lib.build_eval_loader(
                val_url, cfg.data, storage=cfg.storage, img_size=img_size, batch_size=bs, rank=ctx.rank, world_size=ctx.world_size
            )
            query, query_labels = extract_features(embed, val_batches, **common)
            num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
            metrics["val/knn_top1"] = knn_top1(bank, bank_labels, query, query_labels, num_classes, k=cfg.train.knn_k)
    finally:
        module.train(was_training)
    return metrics
