"""Packs an image folder or archive into a WebDataset shard data set at any fsspec URL.

    python jobs/prepare_data.py ~/imagenet/train s3://bucket/imagenet/train --shard-size 256MB
    python jobs/prepare_data.py photos.tar.gz /data/photos --endpoint-url http://minio:9000

SRC: an ImageNet-layout folder (class/xxx.JPEG: labeled), a flat folder (unlabeled), or one
.tar/.tar.gz/.tgz/.zip archive, local or remote. DEST gets shard-NNNNNN.tar files and
manifest.json, which is written last. Re-running with the same SRC and DEST resumes.
Credentials come from the standard AWS_* environment variables and are never printed.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

try:
    import service  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import StorageConfig  # noqa: E402
from service.data.errors import DataError  # noqa: E402
from service.data.prepare import DEFAULT_SHARD_BYTES, prepare_dataset  # noqa: E402
from service.data.storage import storage_options  # noqa: E402

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
          "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """``256MB`` -> 268435456. Units are powers of 1024 (KB = KiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use e.g. 256MB, 1.5GB, 64KB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", metavar="SRC", help="image folder or archive (any fsspec URL)")
    parser.add_argument("dest", metavar="DEST", help="destination (s3://bucket/prefix, a path...)")
    parser.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                        help="target shard size, e.g. 256MB (default), 1GB")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="also close a shard after this many images")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (MinIO...); default: AWS_ENDPOINT_URL")
    parser.add_argument("--region", default=None, help="default: AWS_REGION / AWS_DEFAULT_REGION")
    parser.add_argument("--anon", action="store_true", help="read a public bucket anonymously")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="order in which images are written (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a data set already at DEST instead of resuming")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    options = storage_options(StorageConfig(endpoint_url=args.endpoint_url, region=args.region,
                                            anon=args.anon))
    try:
        manifest = prepare_dataset(args.src, args.dest, shard_bytes=args.shard_size,
                                   storage_options=options,
                                   samples_per_shard=args.samples_per_shard,
                                   shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                                   overwrite=args.overwrite)
    except DataError as exc:
        logging.error("%s", exc)
        return 2
    print(f"{manifest['num_samples']} images in {manifest['num_shards']} shards, "
          f"{manifest['num_classes']} classes -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
