"""ConvMAE or a plain-ViT MAE? Both pretrained on the same budget of FLOPs, scored the same way.

Each model of the pair (default ``convmae_tiny`` and ``mae_tiny``, its plain-ViT match) is
pretrained from scratch on the embedded digits (scikit-learn's 1797 real 8x8 scans, the
service's 90/10 split, rendered at ``--img-size``) for several seeds, then its frozen encoder
is scored with the service's own k-NN (``knn_top1``: cosine, k=20, T=0.07) and linear probe
(``linear_probe_top1``) on the pooled embedding ``convmae.encoder_embedding``: fitted on the
train split, scored on the val split. The random start of each seed is scored too: what
pretraining added.

Equal budget: every model gets the same total pretraining FLOPs (forward + backward, counted by
``service/runtime/flops.py`` at the run's image size and mask ratio): ``--epochs`` epochs of the
first model, the others as many steps as the same FLOPs buy them. Both see the same images
and the same per-step mask seeds.

Training is in this process: plain ``torch.optim.AdamW`` with the service's parameter groups
and learning-rate schedule (``service.runtime.optim``), the service's defaults for base lr,
betas and weight decay, no augmentation. No Ray, no DeepSpeed: on one CPU process they add
nothing to what is compared.

    python3 benchmarks/compare_mae.py                 # the README table (see README for its time)
    python3 benchmarks/compare_mae.py --seeds 5 --epochs 60 --json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import convmae  # noqa: E402
from service.config import PretrainConfig  # noqa: E402
from service.data.embedded import digit_images, split_indices  # noqa: E402
from service.data.transforms import normalize_batch  # noqa: E402
from service.evaluation.linear_probe import linear_probe_top1  # noqa: E402
from service.evaluation.metrics import knn_top1  # noqa: E402
from service.runtime.flops import pretraining_flops_per_image  # noqa: E402
from service.runtime.optim import lr_at, param_groups  # noqa: E402

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PretrainConfig().train
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convmae_tiny,mae_tiny",
                   help="comma-separated presets; the first sets the FLOP budget (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="pretraining runs per model (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=25.0,
                   help="epochs of the first model; the budget of every model (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=64, help="digits are rendered at this size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="default: %(default)s")
    p.add_argument("--blr", type=float, default=defaults.blr, help="base lr, scaled by batch/256 (default: %(default)s)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="of the steps (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    # One thread: these models are too small for two to help, and on a busy machine two threads
    # per process made a step several times slower.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; default: %(default)s)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.models:
        if name not in convmae.PRESETS:
            p.error(f"--models: {name!r} is not a preset; choose from {', '.join(sorted(convmae.PRESETS))}")
    if len(args.models) < 1 or args.seeds < 1 or args.epochs <= 0 or args.batch_size < 1:
        p.error("--models needs a preset, --seeds, --epochs and --batch-size must be positive")
    return args


def digits(img_size: int, limit: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train"|"val": (normalised images (N, 3, S, S), labels (N,))}, the service's split."""
    pngs, labels = digit_images(img_size)
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]))
    images = normalize_batch(pixels.permute(0, 3, 1, 2).contiguous())
    out = {}
    for split, idx in split_indices(labels).items():
        idx = idx[:limit] if limit and split == "train" else idx
        out[split] = (images[idx], torch.from_numpy(labels[idx]))
    return out


@dataclass
class Run:
    model: str
    seed: int
    steps: int
    final_loss: float
    knn: float
    probe: float
    random_knn: float
    random_probe: float
    seconds: float


@torch.no_grad()
def scores(model: torch.nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(k-NN top-1, linear-probe top-1) of the frozen encoder: fitted on train, scored on val."""
    model.eval()
    feats = {split: torch.cat([convmae.encoder_embedding(model, x) for x in images.split(256)])
             for split, (images, _) in data.items()}
    (_, y_train), (_, y_val) = data["train"], data["val"]
    knn = knn_top1(feats["train"], y_train, feats["val"], y_val, NUM_CLASSES)
    probe = linear_probe_top1(feats["train"], y_train, feats["val"], y_val, NUM_CLASSES)
    return knn, probe


def pretrain(name: str, seed: int, steps: int, data: dict, args: argparse.Namespace) -> Run:
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = convmae.build_model(name, img_size=args.img_size)
    random_knn, random_probe = scores(model, data)
    model.train()
    lr = args.blr * args.batch_size / 256
    train = PretrainConfig().train
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=lr, betas=tuple(train.betas))
    images = data["train"][0]
    order = torch.Generator().manual_seed(seed)  # the same image order for every model of a seed
    perm, cursor, losses = torch.randperm(len(images), generator=order), 0, []
    for step in range(steps):
        if cursor + args.batch_size > len(perm):
            perm, cursor = torch.randperm(len(images), generator=order), 0
        batch = images[perm[cursor : cursor + min(args.batch_size, len(perm))]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=lr, min_lr=0.0, warmup_steps=int(args.warmup_fraction * steps),
                                total_steps=steps)
        loss, _, _ = model(batch, mask_ratio=args.mask_ratio,
                           generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    knn, probe = scores(model, data)
    tail = losses[-max(1, steps // 10):]
    return Run(name, seed, steps, sum(tail) / len(tail), knn, probe, random_knn, random_probe,
               time.perf_counter() - started)


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run], budget: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in budget["models"]:
        mine = [r for r in runs if r.model == name]
        row: dict[str, Any] = {"model": name, "params": budget["params"][name],
                               "mflops_per_image": budget["flops_per_image"][name] / 1e6,
                               "steps": mine[0].steps, "seeds": len(mine)}
        for key in ("final_loss", "knn", "probe", "random_knn", "random_probe"):
            row[key], row[key + "_std"] = spread([getattr(r, key) for r in mine])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], budget: dict[str, Any]) -> str:
    def pm(row: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
        return f"{row[key] * scale:.{digits}f} ± {row[key + '_std'] * scale:.{digits}f}"

    lines = [f"Equal pretraining FLOPs: {budget['total_flops'] / 1e12:.2f} TFLOP per model "
             f"({budget['epochs']:g} epochs of {budget['models'][0]}), digits {budget['img_size']} px, "
             f"{budget['train_images']} train / {budget['val_images']} val images, "
             f"mean ± std over {budget['seeds']} seeds",
             "| model | params | MFLOP/img | steps | final loss | k-NN top-1 % | linear probe top-1 % "
             "| random init k-NN % | random init probe % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e3:.0f}k | {r['mflops_per_image']:.1f} | {r['steps']} "
                     f"| {pm(r, 'final_loss', 1.0, 3)} | {pm(r, 'knn')} | {pm(r, 'probe')} "
                     f"| {pm(r, 'random_knn')} | {pm(r, 'random_probe')} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = digits(args.img_size, args.limit)
    n_train = len(data["train"][0])
    flops = {name: pretraining_flops_per_image(convmae.get_config(name, img_size=args.img_size), args.mask_ratio)
             for name in args.models}
    with torch.device("meta"):
        params = {name: sum(p.numel() for p in convmae.build_model(name, img_size=args.img_size).parameters())
                  for name in args.models}
    total = args.epochs * n_train * flops[args.models[0]]
    steps = {name: max(1, round(total / (flops[name] * args.batch_size))) for name in args.models}
    budget = {"models": args.models, "epochs": args.epochs, "img_size": args.img_size, "seeds": args.seeds,
              "train_images": n_train, "val_images": len(data["val"][0]), "total_flops": total,
              "flops_per_image": flops, "params": params, "batch_size": args.batch_size}
    runs = []
    for seed in range(args.seeds):
        for name in args.models:
            r = pretrain(name, seed, steps[name], data, args)
            print(f"{name} seed {seed}: {r.steps} steps, loss {r.final_loss:.3f}, k-NN {r.knn:.3f}, "
                  f"probe {r.probe:.3f} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
            runs.append(r)
    rows = summarise(runs, budget)
    return {"budget": budget, "rows": rows, "runs": [vars(r) for r in runs], "table": table(rows, budget)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - started
    print(result["table"])
    print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}))


if __name__ == "__main__":
    main()
