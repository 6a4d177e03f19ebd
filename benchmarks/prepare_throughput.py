"""Data preparation throughput: images/s of jobs/prepare_data.py's packing, one process against
N Ray workers, on generated photo-like JPEGs, stored as they are and scaled down (--max-side).

    python benchmarks/prepare_throughput.py                          # 2000 500x375 JPEGs, 2 workers
    python benchmarks/prepare_throughput.py --images 200 --workers 2 --max-side 256 --json

Writes ``--images`` JPEGs (ImageNet's average 500x375 by default) into a temporary ImageNet-
layout folder, then prepares it into a fresh local destination once per setting: 1 process
(``workers=1``, no Ray) and ``--workers`` Ray tasks, each without and with ``--max-side``
(re-encoding costs far more than copying). The Ray cluster, and its worker processes (by a
warm-up preparation of a few images), are started before the clock runs: a job pays that once
(``ray_start_s`` + ``worker_start_s``, printed), which is nothing against ImageNet's hours and
would swamp a 2000-image figure. Prints images/s per setting, the speed-up, and what
ImageNet-1k's 1,281,167 training images would take at that rate. Only wall time on this
machine: on a shared one, other load shows in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from benchmarks.data_throughput import write_images  # noqa: E402
from service.runtime.preparation import prepare_distributed  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def measure(src: Path, dest: Path, workers: int, max_side: int | None) -> dict:
    started = time.perf_counter()
    manifest = prepare_distributed(str(src), str(dest), workers=workers, max_side=max_side)
    seconds = time.perf_counter() - started
    rate = manifest["num_samples"] / seconds
    return {"workers": workers, "max_side": max_side, "images": manifest["num_samples"],
            "shards": manifest["num_shards"], "seconds": round(seconds, 2), "img_per_s": round(rate, 1),
            "imagenet_hours": round(IMAGENET_TRAIN_IMAGES / rate / 3600, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers to compare with one process")
    parser.add_argument("--max-side", type=int, default=256, help="the scaled-down setting's --max-side")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.source_size.lower().split("x"))

    import ray

    from service.runtime.cluster import connect_ray

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        src = Path(tmp) / "src"
        source_bytes = write_images(src, args.images, (width, height))
        started = time.perf_counter()
        connect_ray(None, num_cpus=args.workers)
        ray_start = time.perf_counter() - started
        warm_up = Path(tmp) / "warm-up"
        write_images(warm_up, 4 * args.workers, (64, 48))
        started = time.perf_counter()
        prepare_distributed(str(warm_up), str(Path(tmp) / "warm-up-out"), workers=args.workers)
        worker_start = time.perf_counter() - started
        rows = []
        for max_side in (None, args.max_side):
            for workers in (1, args.workers):
                dest = Path(tmp) / f"out-{workers}-{max_side}"
                rows.append(measure(src, dest, workers, max_side))
        ray.shutdown()
    print(f"{args.images} JPEGs of {width}x{height} ({source_bytes / args.images / 1024:.0f} KB each); "
          f"Ray start {ray_start:.1f} s, its workers' {worker_start:.1f} s (not counted)")
    print(f"{'setting':<28}{'images/s':>10}{'seconds':>10}{'ImageNet-1k':>14}")
    for row in rows:
        setting = (f"{'1 process' if row['workers'] == 1 else str(row['workers']) + ' Ray workers'}"
                   f"{', max-side ' + str(row['max_side']) if row['max_side'] else ', as stored'}")
        print(f"{setting:<28}{row['img_per_s']:>10.1f}{row['seconds']:>10.1f}{row['imagenet_hours']:>12.2f} h")
    speedups = {f"max_side={m}": round(rows[2 * i + 1]["img_per_s"] / rows[2 * i]["img_per_s"], 2)
                for i, m in enumerate((None, args.max_side))}
    print("speed-up of", args.workers, "workers:", ", ".join(f"{k}: {v}x" for k, v in speedups.items()))
    if args.json:
        print(json.dumps({"images": args.images, "source_size": [width, height], "ray_start_s": round(ray_start, 1),
                          "worker_start_s": round(worker_start, 1),
                          "rows": rows, "speedup": speedups}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
