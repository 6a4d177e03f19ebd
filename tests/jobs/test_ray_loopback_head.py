"""README's one-machine head (Run on a cluster): with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and
loopback addresses every port of `ray start --head` listens on 127.0.0.1 only, and with its own
ports it takes jobs beside another Ray. The head runs in its own session (`--block`) with its
own ports and temp dir, and only its processes are killed (never `ray stop`)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray") or "ray"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

pytestmark = pytest.mark.slow


def listening_addresses(session: int) -> set[tuple[str, int]]:
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) != session:
                continue
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_the_readme_head_listens_on_loopback_only_and_takes_jobs():
    assert f"{LOOPBACK_ENV}=0" in (REPO / "README.md").read_text()
    temp = tempfile.mkdtemp(prefix="lh", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = free_port()
    env = {**os.environ, "HOME": temp, LOOPBACK_ENV: "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--num-cpus", "1", "--temp-dir", f"{temp}/ray", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                  "python", "-c", "print('job ran')"]
        for _ in range(40):  # the dashboard and its job agent come up after the head starts
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "job ran" in done.stdout
        addresses = listening_addresses(head.pid)
        assert ("127.0.0.1", dashboard) in addresses, addresses
        assert all(is_loopback(ip) for ip, _ in addresses), sorted(addresses)
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        for proc in psutil.process_iter(["cmdline"]):  # any that left the session but run from our temp dir
            try:
                if any(temp in part for part in proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)

