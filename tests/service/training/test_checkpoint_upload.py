"""Checkpoint uploads survive a storage outage: Ray Train's own upload (its StorageContext over
our S3 filesystem), against a real S3 server that goes down and comes back."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from service.config import StorageConfig
from service.training.checkpoints import persist_with_retries
from service.training.launch import storage_location


class Outage:
    """A moto server on a fixed port that can be stopped and started again (its buckets live
    in the process, so they are still there after a restart)."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.up = True

    def stop(self) -> None:
        self.server.stop()
        self.up = False

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.up = True


@pytest.fixture
def outage(s3_server) -> Iterator[Outage]:  # s3_server: the fake AWS credentials and region
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Outage()
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="ckpt-outage")
    yield server
    if server.up:
        server.stop()


@pytest.fixture
def run_storage(outage):
    """Ray Train's StorageContext of a run under s3://ckpt-outage/runs, and a local checkpoint."""
    from ray.train.v2._internal.execution.storage import StorageContext

    path, fs = storage_location("s3://ckpt-outage/runs", StorageConfig(endpoint_url=outage.endpoint, max_retries=0))
    return StorageContext(path, "run", fs)


def local_checkpoint(tmp_path):
    from ray.train import Checkpoint

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"weights" * 1000)
    return Checkpoint.from_directory(str(tmp_path / "ckpt"))


def test_an_upload_during_an_outage_is_retried_until_storage_is_back(outage, run_storage, tmp_path, caplog):
    delays = []

    def wait(seconds: float) -> None:  # the outage ends during the first backoff
        delays.append(seconds)
        outage.start()

    outage.stop()
    with caplog.at_level(logging.WARNING, logger="service.data.storage"):
        persisted = persist_with_retries(run_storage, local_checkpoint(tmp_path), "checkpoint_000001",
                                         max_retries=3, sleep=wait)
    assert len(delays) == 1 and "uploading checkpoint checkpoint_000001 failed (EndpointConnectionError" in caplog.text
    assert persisted.path == "ckpt-outage/runs/run/checkpoint_000001"
    body = boto3.client("s3", endpoint_url=outage.endpoint).get_object(
        Bucket="ckpt-outage", Key="runs/run/checkpoint_000001/model.pt")["Body"].read()
    assert body == b"weights" * 1000


def test_a_lasting_outage_fails_after_the_bounded_retries(outage, run_storage, tmp_path):
    delays = []
    outage.stop()
    with pytest.raises(Exception, match="Could not connect to the endpoint URL") as err:
        persist_with_retries(run_storage, local_checkpoint(tmp_path), "checkpoint_000002", max_retries=2,
                             sleep=delays.append)
    assert type(err.value).__name__ == "EndpointConnectionError"
    assert len(delays) == 2 and delays[1] >= delays[0]  # exponential backoff (with jitter)


def checkpoint_folder(path, seed: int):
    """A checkpoint folder as a worker writes it: several files, then the manifest."""
    import torch
    from ray.train import Checkpoint

    from service.runtime.safe_checkpoint import write_manifest

    (path / "ds").mkdir(parents=True)
    for i in range(4):
        torch.save({"weights": torch.full((50_000,), seed * 10.0 + i)}, path / "ds" / f"part_{i}.pt")
    (path / "train_state.json").write_text(f'{{"optimizer_step": {seed}}}')
    write_manifest(path)
    return Checkpoint.from_directory(str(path))


def test_an_upload_cut_off_midway_leaves_the_previous_checkpoint_whole(outage, tmp_path):
    """The connection to storage breaks after the upload of a new checkpoint has written two of
    its files: the upload fails, the previous checkpoint is untouched and still verifies, the
    cut-off one is recognised as incomplete (resuming skips it), and retrying it completes it."""
    import pyarrow.fs
    from fsspec.implementations.arrow import ArrowFSWrapper
    from ray.train.v2._internal.execution.storage import StorageContext

    from service.runtime.safe_checkpoint import DamagedCheckpointError, verify_checkpoint

    path, fs = storage_location("s3://ckpt-outage/runs", StorageConfig(endpoint_url=outage.endpoint, max_retries=0))

    class CutOff(pyarrow.fs.FSSpecHandler):
        """The run's own S3 filesystem, whose connection breaks after ``after_files`` files."""

        def __init__(self, fs, after_files: int) -> None:
            super().__init__(fs)
            self.after_files, self.written = after_files, 0

        def open_output_stream(self, path, metadata):
            if self.written == self.after_files:
                raise ConnectionResetError(f"injected: connection reset while uploading {path}")
            self.written += 1
            return super().open_output_stream(path, metadata)

    s3 = fs.handler.fs
    persist_with_retries(StorageContext(path, "run", fs), checkpoint_folder(tmp_path / "a", 1), "checkpoint_a",
                         max_retries=0)
    cut = CutOff(s3, after_files=2)
    with pytest.raises(ConnectionResetError, match="injected"):
        persist_with_retries(StorageContext(path, "run", pyarrow.fs.PyFileSystem(cut)),
                             checkpoint_folder(tmp_path / "b", 2), "checkpoint_b", max_retries=0)
    assert cut.written == 2  # it had started writing the new checkpoint

    def download(name: str, attempt: int = 0):
        local = tmp_path / f"download_{attempt}" / name
        s3.invalidate_cache()
        ArrowFSWrapper(fs).get(f"{path}/run/{name}/", str(local) + "/", recursive=True)
        return local

    verify_checkpoint(download("checkpoint_a"))  # the previous one: whole
    with pytest.raises(DamagedCheckpointError, match="checkpoint_b"):
        verify_checkpoint(download("checkpoint_b"), label="checkpoint_b")
    # Retried: complete, over what the cut-off attempt left.
    persist_with_retries(StorageContext(path, "run", fs), checkpoint_folder(tmp_path / "b2", 2), "checkpoint_b",
                         max_retries=1)
    verify_checkpoint(download("checkpoint_b", attempt=1))
