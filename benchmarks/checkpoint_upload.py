"""What a checkpoint costs the training steps, uploaded in the background or while training waits.

    python benchmarks/checkpoint_upload.py                               # convmae_base, CPU, local S3 server
    python benchmarks/checkpoint_upload.py --model convmae_small --steps 10 --checkpoint-at 4 --json

One Ray Train worker (a local Ray cluster started here) per mode runs the pretraining step as the service
does (``Engine.build`` with the generated DeepSpeed config, ZeRO-2 fp32 on CPU, synthetic
images) and, after step ``--checkpoint-at``, saves a checkpoint with the service's
``CheckpointWriter``: ``background`` (``checkpoint.background_upload=true``: written locally,
uploaded by Ray Train's ``CheckpointUploadMode.ASYNC`` thread while training goes on) or ``sync``
(training waits for the upload). The checkpoints go to a loopback S3 server (moto in server
mode, ``--storage s3``) or a local folder (``--storage local``). Per mode it prints the median
step time without a checkpoint, the time the checkpoint step kept training waiting, the median
of the steps that ran while the upload was in flight (an upload takes CPU too: on a small
machine, and with the loopback S3 server on the same cores, it slows the steps it overlaps),
the time the run waited for the upload at its end, what the checkpoint cost the run in all
(the steps from the checkpoint on, and the wait at the end, beyond as many median steps); and
the checkpoint's size on storage. The modes run one after the other, the same
steps, on the same machine; wall times, so a busy machine shows up in them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: steps, one checkpoint, the step times reported back."""
    import torch

    import convmae
    from service.config import PretrainConfig, with_overrides
    from service.runtime.engine import Engine
    from service.runtime.worker import worker_context
    from service.training.checkpoints import CheckpointWriter, TrainState

    torch.set_num_threads(config["threads"])
    ctx = worker_context()
    cfg = with_overrides(PretrainConfig(), {"dist.num_workers": 1, "dist.zero_stage": 2,
                                            "train.batch_size_per_worker": config["batch_size"]})
    torch.manual_seed(0)
    model = convmae.build_model(config["model"], img_size=config["img_size"])
    engine = Engine.build(model, cfg, use_gpu=False, precision="fp32", lr=1e-4)
    writer = CheckpointWriter(ctx.rank, max_retries=0, background=config["background"])
    images = torch.randn(config["batch_size"], 3, config["img_size"], config["img_size"],
                         generator=torch.Generator().manual_seed(1))
    state, steps = TrainState(), []
    for step in range(1, config["steps"] + 1):
        start = time.perf_counter()
        loss, _, _ = engine(images, mask_ratio=0.75, generator=torch.Generator().manual_seed(step))
        engine.backward_and_step(loss)
        computed = time.perf_counter()
        state.optimizer_step = step
        if step == config["checkpoint_at"]:
            writer.save(engine, state, {"step": step})
        steps.append({"step": step, "compute_s": computed - start, "total_s": time.perf_counter() - start})
    start = time.perf_counter()
    writer.wait()
    # A file, not a report: Ray Train's Result keeps the metrics of the last checkpoint's report.
    Path(config["timings_file"]).write_text(json.dumps({"steps": steps, "end_wait_s": time.perf_counter() - start}))


def run_mode(background: bool, args: argparse.Namespace, storage_url: str, storage_cfg: Any,
             tmp: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from service.training.launch import storage_location

    path, fs = storage_location(storage_url, storage_cfg)
    name = f"{'background' if background else 'sync'}-{int(time.time())}"
    trainer = TorchTrainer(
        worker,
        train_loop_config={"background": background, "model": args.model, "img_size": args.img_size,
                           "batch_size": args.batch_size, "steps": args.steps, "checkpoint_at": args.checkpoint_at,
                           "threads": args.threads, "timings_file": f"{tmp}/{name}.json"},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs),
    )
    result = trainer.fit()
    timings = json.loads(Path(tmp, f"{name}.json").read_text())  # a local cluster: the worker's file is here
    steps = timings["steps"]
    at = args.checkpoint_at
    plain = [s["total_s"] for s in steps if s["step"] < at and s["step"] > 1]  # step 1 warms up
    during = [s["total_s"] for s in steps[at:at + args.overlap_steps]]
    median = statistics.median(plain)
    return {
        "mode": "background" if background else "sync",
        "median_step_s": median,
        # What the checkpoint cost the run in all: the steps from the checkpoint's on, plus the
        # wait at the end, beyond as many median steps.
        "extra_s": sum(s["total_s"] for s in steps[at - 1:]) + timings["end_wait_s"] - median * (len(steps) - at + 1),
        "checkpoint_step_s": steps[at - 1]["total_s"],
        "blocked_s": steps[at - 1]["total_s"] - steps[at - 1]["compute_s"],
        "median_step_after_checkpoint_s": statistics.median(during) if during else None,
        "end_wait_s": timings["end_wait_s"],
        "checkpoint_bytes": _size(result.checkpoint),
    }


def _size(checkpoint: Any) -> int | None:
    import pyarrow.fs

    if checkpoint is None:
        return None
    infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(checkpoint.path, recursive=True))
    return sum(i.size for i in infos if i.type == pyarrow.fs.FileType.File)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="convmae_base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpoint-at", type=int, default=4)
    parser.add_argument("--overlap-steps", type=int, default=3, help="steps after the checkpoint to summarise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--storage", choices=("s3", "local"), default="s3")
    parser.add_argument("--modes", default="sync,background")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 2 <= args.checkpoint_at < args.steps:
        parser.error("--checkpoint-at must be at least 2 and below --steps")

    from service.config import StorageConfig
    from service.runtime.cluster import connect_ray

    server = None
    with tempfile.TemporaryDirectory(prefix="convmae-bench-ckpt-") as tmp:
        if args.storage == "s3":
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            os.environ.update(FAKE_AWS_ENV)  # before Ray starts: its workers inherit them
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            storage_url, storage_cfg = "s3://bench/runs", StorageConfig(endpoint_url=endpoint, max_retries=0)
        else:
            storage_url, storage_cfg = str(Path(tmp) / "runs"), StorageConfig()
        connect_ray(None, num_cpus=2)
        try:
            rows = [run_mode(mode == "background", args, storage_url, storage_cfg, tmp) for mode in args.modes.split(",")]
        finally:
            if server is not None:
                server.stop()
    if args.json:
        print(json.dumps({"args": vars(args), "results": rows}, indent=1))
        return
    print(f"{args.model} {args.img_size}px batch {args.batch_size}, CPU fp32 ZeRO-2, 1 worker, "
          f"checkpoint after step {args.checkpoint_at} to {args.storage}")
    for row in rows:
        print(f"{row['mode']:>10}: median step {row['median_step_s']:.2f} s; checkpoint step "
              f"{row['checkpoint_step_s']:.2f} s (training waited {row['blocked_s']:.2f} s); steps while "
              f"uploading {row['median_step_after_checkpoint_s'] or float('nan'):.2f} s; waited at the end "
              f"{row['end_wait_s']:.2f} s; the checkpoint cost the run {row['extra_s']:.1f} s in all; "
              f"checkpoint {row['checkpoint_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
