"""Ray start-up: a local run starts its own Ray, bound to loopback, and never joins a cluster
it merely found (a stale address file, another user's cluster on the same machine).

Each case runs in a subprocess with its own ``RAY_TMPDIR``: the test session's shared Ray
(``ray_cluster``) lives in this process, and ``/tmp/ray`` belongs to everyone on the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import ConfigError, PretrainConfig, with_overrides
from tests.fixtures.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[3]

# Starts a local run's Ray the way the jobs do and reports what it started.
PROBE = """
import json, psutil, ray
from service.runtime.cluster import connect_ray

connect_ray(None, num_cpus=1)
node = ray._private.worker._global_node
me = psutil.Process()
listening = set()
for proc in [me, *me.children(recursive=True)]:
    try:
        listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print("PROBE " + json.dumps({"gcs": node.gcs_address, "listening": sorted(listening),
                              "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
ray.shutdown()
"""


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A private Ray temp dir, short enough for Ray's unix socket paths."""
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:
        (Path(tmp) / "ray").mkdir()
        yield Path(tmp)


def probe_env(ray_tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(ROOT)}


def run_probe(ray_tmpdir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=probe_env(ray_tmpdir), capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_a_stale_cluster_address_does_not_break_a_local_start_and_its_ports_are_loopback_only(ray_tmpdir):
    # What a cluster that is gone leaves behind: `ray start` wrote its address, nothing listens there.
    stale = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(stale)

    started = run_probe(ray_tmpdir)

    assert started["gcs"] != stale and started["nodes"] == 1
    assert started["listening"], "found no listening sockets of the started cluster"
    exposed = [ip for ip in started["listening"] if not is_loopback(ip)]
    assert not exposed, f"the local cluster listens on non-loopback addresses: {exposed}"


@pytest.mark.slow
def test_a_local_run_does_not_join_another_cluster_running_on_the_machine(ray_tmpdir):
    import psutil

    port = free_port()
    other = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--block"],
        env=probe_env(ray_tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address_file = ray_tmpdir / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 180
        while not address_file.exists():
            assert other.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        other_address = address_file.read_text().strip()

        started = run_probe(ray_tmpdir)

        assert started["gcs"] != other_address
        assert started["nodes"] == 1  # its own node only, not the other cluster's
    finally:
        # Stop exactly the processes of the cluster this test started, by pid.
        procs = [other, *psutil.Process(other.pid).children(recursive=True)] if other.poll() is None else []
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        _, alive = psutil.wait_procs([psutil.Process(p.pid) for p in procs if psutil.pid_exists(p.pid)], timeout=30)
        for proc in alive:
            proc.kill()
        other.wait(timeout=30)


def test_gpu_settings_a_cpu_cluster_cannot_honour_are_refused_naming_the_key(ray_cluster):
    from service.config import ConfigError, PretrainConfig, with_overrides
    from service.runtime.cluster import cluster_has_gpus, resolve_use_gpu

    assert not cluster_has_gpus()  # the test cluster: CPUs only
    with pytest.raises(ConfigError, match=r"^dist.use_gpu=true but the Ray cluster has no GPUs; set dist.use_gpu=false$"):
        resolve_use_gpu(with_overrides(PretrainConfig(), {"dist.use_gpu": True}))
    for use_gpu in (False, None):  # said, or found out from the cluster
        cfg = with_overrides(PretrainConfig(), {"dist.use_gpu": use_gpu, "dist.offload_optimizer": True})
        with pytest.raises(ConfigError, match=r"^dist.offload_optimizer=true needs GPU workers .* set "
                                              r"dist.offload_optimizer=false for CPU training$"):
            resolve_use_gpu(cfg)
        assert resolve_use_gpu(with_overrides(cfg, {"dist.offload_optimizer": False})) is False


def test_an_address_to_join_that_is_not_a_gcs_is_one_line_with_the_fix(ray_tmpdir):
    # The dashboard's http:// address (what `ray job submit` takes) exported for a direct run.
    code = "from service.runtime.cluster import connect_ray; connect_ray('http://127.0.0.1:8265')"
    done = subprocess.run([sys.executable, "-c", code], env=probe_env(ray_tmpdir), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "ConfigError: dist.ray_address='http://127.0.0.1:8265'" in last
    assert "GCS address (host:port, printed by `ray start --head`)" in last and "ray job submit" in last


# ------------------------------------------------ storage every node can reach


@pytest.mark.parametrize(("key", "url"), [
    ("checkpoint.storage_path", "/data/runs"),
    ("checkpoint.storage_path", "file:///data/runs"),
    ("data.url", "convmae_data/digits/train"),
    ("mlflow.tracking_uri", "sqlite:///mlruns.db"),
    ("mlflow.tracking_uri", "file:./mlruns"),
])
def test_a_location_on_one_node_is_refused_on_a_cluster_of_several(key, url):
    from service.runtime.cluster import require_shared_storage

    with pytest.raises(ConfigError, match=rf"{key}=.*one node only.*--storage.root s3://.*shared_local_paths true"):
        require_shared_storage({key: url}, nodes=3)


def test_locations_every_node_reaches_pass_and_one_node_needs_none():
    from service.runtime.cluster import require_shared_storage

    shared = {"checkpoint.storage_path": "s3://bucket/runs", "data.url": "gs://bucket/train",
              "mlflow.tracking_uri": "http://mlflow.internal:5000"}
    require_shared_storage(shared, nodes=3)
    require_shared_storage({"checkpoint.storage_path": "/data/runs", "mlflow.tracking_uri": "sqlite:///m.db"}, nodes=1)


def test_a_shared_mount_is_allowed_when_said_so_but_memory_never():
    from service.runtime.cluster import require_shared_storage

    require_shared_storage({"checkpoint.storage_path": "/mnt/nfs/runs", "mlflow.tracking_uri": "sqlite:///m.db"},
                           shared_local_paths=True, nodes=3)
    with pytest.raises(ConfigError, match=r"data.url='memory://train' is not allowed"):
        require_shared_storage({"data.url": "memory://train"}, shared_local_paths=True, nodes=3)


def test_credentials_in_a_refused_url_are_not_repeated():
    from service.runtime.cluster import require_shared_storage

    with pytest.raises(ConfigError) as refused:
        require_shared_storage({"data.url": "file://user:hunter2@/data"}, nodes=2)
    assert "hunter2" not in str(refused.value)


# ------------------------------------------------ elastic runs


def test_elastic_scaling_is_a_range_and_fixed_stays_a_number():
    from service.runtime.cluster import scaling_config

    fixed = with_overrides(PretrainConfig(), {"dist.num_workers": 3}).validate()
    assert scaling_config(fixed, use_gpu=False).num_workers == 3
    elastic = with_overrides(PretrainConfig(), {"dist.num_workers": 3, "dist.min_workers": 2,
                                                "train.grad_accum_steps": 2, "dist.resize_check_s": 5}).validate()
    scaling = scaling_config(elastic, use_gpu=False)
    assert scaling.num_workers == (2, 3) and scaling.elastic_resize_monitor_interval_s == 5


def test_the_global_batch_and_lr_do_not_depend_on_the_workers_alive():
    cfg = with_overrides(PretrainConfig(), {"dist.num_workers": 4, "dist.min_workers": 2,
                                            "train.grad_accum_steps": 3}).validate()
    for workers in (2, 3, 4):
        at = cfg.at_world_size(workers)
        assert at.dist.num_workers == workers
        assert at.effective_batch_size == cfg.effective_batch_size
        assert at.learning_rate == cfg.learning_rate
    assert cfg.at_world_size(2).train.grad_accum_steps == 6


@pytest.mark.parametrize(("overrides", "match"), [
    ({"dist.num_workers": 3, "dist.min_workers": 2},
     r"train.grad_accum_steps=1 is not allowed .*over 2 workers; set train.grad_accum_steps to a multiple of 2"),
    ({"dist.num_workers": 2, "dist.min_workers": 3}, r"dist.min_workers=3 is not allowed: 1 to dist.num_workers=2"),
    ({"dist.num_workers": 2, "dist.min_workers": 0}, r"dist.min_workers=0 is not allowed"),
    ({"dist.resize_check_s": -1}, r"dist.resize_check_s=-1"),
])
def test_bad_elastic_settings_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        with_overrides(PretrainConfig(), overrides).validate()


def test_ray_trains_ctrl_c_exit_is_a_keyboard_interrupt_and_the_jobs_handler_comes_back():
    from service.runtime.cluster import ray_stop_handlers

    def ray_trains_handler(signum, frame):  # what Ray Train's handler does once it aborted its run
        raise SystemExit(0)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), ray_stop_handlers():
        signal.signal(signal.SIGINT, ray_trains_handler)  # as TorchTrainer.fit installs it
        signal.raise_signal(signal.SIGINT)  # Ctrl+C
    assert signal.getsignal(signal.SIGINT) is before

    with ray_stop_handlers():  # a fit that ends normally leaves its handler behind too
        signal.signal(signal.SIGINT, ray_trains_handler)
    assert signal.getsignal(signal.SIGINT) is before
