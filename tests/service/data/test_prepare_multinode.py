"""prepare_data on a Ray cluster of several nodes (slow): the job, reached by address as a user
runs it, spreads its ranges over the worker nodes and writes the same samples as one process."""

from __future__ import annotations

import fsspec
import pytest

from service.data.prepare import prepare_dataset
from tests.service.data.test_prepare import read_everything

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_prepare_data_on_a_multi_node_cluster_gives_the_samples_of_one_process(multinode_cluster, s3_bucket,
                                                                               make_image_folder, tmp_path):
    src = make_image_folder(classes=3, per_class=8)
    fsspec.filesystem("s3").put(str(src), f"{s3_bucket}/raw", recursive=True)
    prepare_dataset(str(src), str(tmp_path / "single"), shard_bytes=8 * 1024)

    log = tmp_path / "prepare.log"
    # Two workers on a head without CPUs: one range task on each worker node at a time.
    job = multinode_cluster.start_job("prepare_data.py", [f"{s3_bucket}/raw", f"{s3_bucket}/shards", "--workers", "2",
                                                          "--shard_size", "8KB", "--val_fraction", "0"], log)
    assert job.wait(timeout=900) == 0, log.read_text()[-4000:]
    assert read_everything(f"{s3_bucket}/shards") == read_everything(str(tmp_path / "single"))
    assert "ranges, written in parallel" in log.read_text()
