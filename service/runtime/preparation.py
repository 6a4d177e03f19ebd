"""Data preparation spread over the Ray cluster: one plain Ray task per range of the source.

The driver lists the source once and cuts its write order into consecutive ranges
(``service.data.prepare.plan_ranges``, 4 per worker, so that a slow range does not hold the
rest up); each task opens the source for reading only, writes its range as shards named after
the range, resumes after that range's shards an earlier run finished, and returns their index
entries. At most ``workers`` tasks run at once. The manifest is written by the driver last, as
a single-process run does. Tasks get no credentials in their arguments: they adopt the
driver's through the object store (``service.runtime.credentials``).
"""

from __future__ import annotations

import logging
from typing import Any

from service.config import StorageConfig
from service.data import storage_options
from service.data.errors import DataError
from service.data.prepare import (
    RangeJob,
    RangeResult,
    RangeRunner,
    prepare_dataset,
    storage_errors_named,
    write_range,
)
from service.data.sources import open_source
from service.data.storage import filesystem
from service.runtime.cluster import connect_ray
from service.runtime.credentials import adopt_credentials, share_credentials

log = logging.getLogger(__name__)

# Ranges per worker: shorter tasks even out uneven ones; each range ends in one part-filled shard.
RANGES_PER_WORKER = 4


def prepare_distributed(src: str, dest: str, *, workers: int | None, storage: StorageConfig | None = None,
                        ray_address: str | None = None, **settings: Any) -> dict[str, Any]:
    """``service.data.prepare.prepare_dataset`` over ``workers`` Ray tasks at a time (None: one
    per CPU of the cluster); 1 prepares in this process, without Ray. ``settings``: the other
    keyword arguments of ``prepare_dataset``. Returns the manifest as a dict.

    The split depends on the number of workers: resume with the same number to keep what an
    interrupted run finished (with another, its shards are rewritten).
    """
    storage = storage or StorageConfig()
    options = storage_options(storage)
    if workers == 1:
        return prepare_dataset(src, dest, storage_options=options, **settings)
    import ray

    connect_ray(ray_address)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        log.info("preparing with %d workers (the cluster's CPUs)", workers)
    return prepare_dataset(src, dest, storage_options=options, num_ranges=workers * RANGES_PER_WORKER,
                           run_ranges=ray_range_runner(storage, workers), **settings)


def ray_range_runner(storage: StorageConfig, workers: int) -> RangeRunner:
    """Writes ranges as Ray tasks of 1 CPU, ``workers`` at a time; the first range that fails
    with a DataError fails the whole with its message."""
    import ray

    credentials = share_credentials()
    task = ray.remote(num_cpus=1)(write_range_task)

    def run(jobs: list[RangeJob]) -> list[RangeResult]:
        results: list[RangeResult | None] = [None] * len(jobs)
        waiting = list(enumerate(jobs))
        running: dict[Any, int] = {}
        while waiting or running:
            while waiting and len(running) < workers:
                number, job = waiting.pop(0)
                running[task.remote(job, storage, credentials)] = number
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                number = running.pop(ref)
                outcome = ray.get(ref)
                if isinstance(outcome, str):
                    for other in running:
                        ray.cancel(other)
                    raise DataError(outcome)
                results[number] = outcome
        return [result for result in results if result is not None]

    return run


def write_range_task(job: RangeJob, storage: StorageConfig, credentials: Any) -> RangeResult | str:
    """One range, in a Ray worker: its RangeResult, or the message of the DataError that
    stopped it (one line, like the single-process job's)."""
    adopt_credentials(credentials)
    options = storage_options(storage)
    try:
        with storage_errors_named(job.src, "cannot read the source"):
            source = open_source(job.src, options, limits=job.limits, listing=False)
        try:
            with storage_errors_named(job.dest, "cannot write the data set"):
                fs, root = filesystem(job.dest, options)
                return write_range(job, source, fs, root)
        finally:
            source.close()
    except DataError as exc:
        return str(exc)
