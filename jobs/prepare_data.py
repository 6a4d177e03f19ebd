"""Packs an image folder or archive into a WebDataset shard data set at any fsspec URL.

    python jobs/prepare_data.py ~/imagenet/train s3://bucket/imagenet/train --shard-size 256MB
    python jobs/prepare_data.py photos.tar.gz /data/photos --endpoint-url http://minio:9000
    python jobs/prepare_data.py ~/imagenet/train /data/in1k-512 --max-side 512
    python jobs/prepare_data.py s3://raw/imagenet s3://bucket/in1k --workers auto --dist.ray_address auto

SRC: an ImageNet-layout folder (class/xxx.JPEG: labeled), a flat folder (unlabeled), or one
.tar/.tar.gz/.tgz/.zip archive, local or remote. DEST gets shard-NNNNNN.tar files and
manifest.json, which is written last. Re-running with the same SRC and DEST resumes.
--max-side N stores images whose shorter side exceeds N scaled down to N (re-encoded; the
manifest records N and how many): less to read and decode per epoch.
Untrusted input is bounded: unsafe member names, links out of SRC, images over
--max_image_bytes (64MB), zip bombs, deep tar nesting and JPEGs cut short or of too many
scans are skipped, warned about and counted in the manifest.
--workers N packs with N Ray tasks at a time over ranges of SRC (0/auto: the cluster's CPUs;
1, the default: this process alone); each range resumes on its own.
Credentials come from the standard AWS_* environment variables and are never printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import PrepareDataConfig  # noqa: E402
from service.config.jobs import parse_size  # noqa: E402,F401  (the size grammar, for callers of this script)

# The flags this job had before it took dotted keys; they still work.
ALIASES = {"endpoint_url": "storage.endpoint_url", "region": "storage.region", "anon": "storage.anon"}


def _prepare(config: PrepareDataConfig) -> dict:
    from service.data.sources import SourceLimits
    from service.runtime.preparation import prepare_distributed

    limits = SourceLimits(max_image_bytes=config.image_bytes_limit,
                          max_expansion_ratio=config.max_expansion_ratio, max_nesting=config.max_nesting)
    return prepare_distributed(config.src, config.dest, workers=config.num_workers, storage=config.storage,
                               ray_address=config.dist.ray_address, shard_bytes=config.shard_bytes,
                               samples_per_shard=config.samples_per_shard, shuffle_seed=config.shuffle_seed,
                               overwrite=config.overwrite, max_side=config.max_side, limits=limits)


def _report(manifest: dict, config: PrepareDataConfig) -> int:
    print(f"{manifest['num_samples']} images in {manifest['num_shards']} shards, "
          f"{manifest['num_classes']} classes -> {config.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    example = "python jobs/prepare_data.py ~/imagenet/train s3://bucket/imagenet/train --shard-size 256MB"
    return run_job("prepare_data.py", __doc__.split("\n\n")[0], PrepareDataConfig, example, _prepare, _report,
                   argv, positionals=("src", "dest"), aliases=ALIASES)


if __name__ == "__main__":
    sys.exit(main())
