"""Every message passes through redaction: log records of any logger, uncaught tracebacks,
a job's one-line error and its printed result carry no URL password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import redact_text

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "s3cr3t-pw"


@pytest.mark.parametrize(("text", "clean"), [
    (f"http://user:{PASSWORD}@127.0.0.1:9/x.pth", "http://127.0.0.1:9/x.pth"),
    (f"cannot read (endpoint http://minio:{PASSWORD}@host:9000)", "cannot read (endpoint http://host:9000)"),
    (f"two: s3://k:{PASSWORD}@b/p and 'https://u:{PASSWORD}@h'", "two: s3://b/p and 'https://h'"),
    (f"http://u:p@{PASSWORD}@host/a", "http://host/a"),  # an unescaped @ in the password
    ("mail me at a@b.c, see http://host/a@b", "mail me at a@b.c, see http://host/a@b"),  # no userinfo
])
def test_redact_text_removes_every_urls_userinfo(text, clean):
    assert redact_text(text) == clean


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_records_of_any_logger_and_their_tracebacks_are_redacted():
    # In a child process: the record factory and exception hooks are process-wide.
    code = f"""
import io, logging
from service.runtime.logs import install_redaction
install_redaction()
out = io.StringIO()
lib = logging.getLogger("some.library")  # its own handler, not propagating: as MLflow's logger is
lib.propagate = False
handler = logging.StreamHandler(out)
handler.setFormatter(logging.Formatter("%(message)s"))
lib.addHandler(handler)
lib.warning("MLflow at %s is unavailable (%s)", "http://user:{PASSWORD}@h:5000", ValueError("http://u:{PASSWORD}@h"))
try:
    raise ConnectionError("cannot connect to https://u:{PASSWORD}@h/api")
except ConnectionError:
    lib.exception("request failed")
print(out.getvalue())
raise RuntimeError("uncaught: s3://key:{PASSWORD}@bucket/x")
"""
    result = run_python(code)
    assert "MLflow at http://h:5000 is unavailable (http://h)" in result.stdout
    assert "ConnectionError: cannot connect to https://h/api" in result.stdout
    assert "RuntimeError: uncaught: s3://bucket/x" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_the_mlflow_unreachable_warning_shows_no_password():
    code = f"""
from service.cli import setup_logging
from service.tracking import open_run
setup_logging()
tracker = open_run("http://user:{PASSWORD}@127.0.0.1:9", "x", identity={{"k": "v"}}, run_name="r")
assert not tracker.enabled
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "MLflow at http://127.0.0.1:9 is unavailable" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def without_credentials() -> dict[str, str]:
    """This environment less any AWS credentials (the S3 fixture sets some): the storage error
    then comes at once (no credentials), not after the retries against a closed port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize(("job", "args", "names"), [
    ("evaluate.py", ["--model", f"http://user:{PASSWORD}@127.0.0.1:9/x.pth"], "--model 'http://127.0.0.1:9/x.pth'"),
    ("pretrain.py", ["--storage.endpoint_url", f"http://user:{PASSWORD}@127.0.0.1:9", "--data.url", "s3://bucket/x"],
     "(endpoint http://127.0.0.1:9)"),
])
def test_a_jobs_error_line_names_the_url_without_its_password(job, args, names, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args, "--data.embedded_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env=without_credentials())
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{job}: error: ") and names in last, last
    assert PASSWORD not in result.stdout + result.stderr


def test_what_a_job_prints_is_redacted(capsys):
    from service.runtime.logs import redacted_stdout

    with redacted_stdout():
        print(f"model http://user:{PASSWORD}@h/x.pth: top-1 0.9")
    assert capsys.readouterr().out == "model http://h/x.pth: top-1 0.9\n"


def test_known_printed_noise_is_dropped_and_every_other_line_passes(capsys):
    from service.runtime.logs import DEEPSPEED_PRINTS, dropping_printed_lines

    with dropping_printed_lines(DEEPSPEED_PRINTS):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("Processing zero checkpoint '/x/ds'")
        print("a real problem: shard 3 is missing")
        print("Reconstructed fp32 state dict with 103 params 360320 elements")
        print("no newline at the end", end="")
    assert capsys.readouterr().out == "a real problem: shard 3 is missing\nno newline at the end"


def test_known_logged_noise_is_dropped_at_its_logger_and_its_other_messages_pass():
    code = """
import io, logging
from service.runtime.logs import quiet_known_noise
quiet_known_noise()
out = io.StringIO()
logging.basicConfig(stream=out, level=logging.INFO, format="%(name)s %(message)s")
db = logging.getLogger("mlflow.store.db.utils")
db.info("Creating initial MLflow database tables...")
db.warning("the store is read-only")
logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
print(out.getvalue(), end="")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "mlflow.store.db.utils the store is read-only\n"


def test_ray_trains_traceback_of_bad_input_is_dropped_and_of_any_other_error_kept():
    # Ray Train's own reporting of a failed training function, called as its worker calls it
    # (inside the except block); a child process: the filters are process-wide.
    code = """
from service.runtime.logs import quiet_known_noise
quiet_known_noise()
from ray.train.v2._internal.util import construct_user_exception_with_traceback  # logs to stderr
from service.data import DataError
for error in (DataError("shard-000000.tar: checksum mismatch"), RuntimeError("CUDA error: an illegal memory access")):
    try:
        raise error
    except Exception as caught:
        construct_user_exception_with_traceback(caught)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Error in training function") == 1 and result.stderr.count("Traceback") == 1
    assert "RuntimeError: CUDA error" in result.stderr  # a crash keeps its traceback
    assert "DataError" not in result.stderr and "checksum" not in result.stderr


def test_known_forwarded_noise_is_dropped_where_ray_prints_other_processes_lines():
    # Ray's own printer of forwarded lines, registered as ray.init registers it, fed a batch as
    # its log subscriber hands them over (the line is the one a submitted run's controller printed).
    code = """
import functools
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
from ray._private.worker import print_to_stdstream
from service.runtime.logs import quiet_forwarded_noise
dispatcher.add_handler("ray_print_logs", functools.partial(print_to_stdstream, ignore_prefix=False))
quiet_forwarded_noise()
quiet_forwarded_noise()  # idempotent: one printer
noise = ("[2026-12-07 21:12:12,388 E 31288 31338] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
         "and ID: 'e08b496117dd5551c094020202000000' has constructor arguments in the object store and "
         "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
         "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 31288, "actor_name": "TrainController",
                 "is_err": True, "job": "01000000", "lines": [noise, "a real problem: the node is gone"]})
cleaner = ("Detected that the Ray Train controller actor (445e3431c1dde44d8d5d73c201000000) is dead. Cleaning up "
           "placement group = [PlacementGroupID(2795c4930c9e764ca8aa148d52b101000000)] created by this run.")
dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 14900, "actor_name": "PlacementGroupCleaner",
                 "is_err": True, "job": "01000000", "lines": [cleaner]})
print(len(dispatcher.handlers))
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert "a real problem: the node is gone" in result.stderr
    assert "PreemptionWatcher" not in result.stderr
    assert "Cleaning up placement group" not in result.stderr and "PlacementGroupCleaner" not in result.stderr
