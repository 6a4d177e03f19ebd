"""How soon the zero-flag pretraining job takes its first step, and where the seconds before it go.

    python benchmarks/startup.py                       # 3 timed runs of `python jobs/pretrain.py`
    python benchmarks/startup.py --runs 5 --json -- --train.eval_before_training false

Each run is the job as a user starts it (a new process, its own local Ray cluster, the embedded
data set, a local MLflow store) in a new directory of its own, so none resumes another, with
``--train.max_steps`` (default 1) and the flags after ``--``. All share one embedded data set: a
first, untimed run generates it and warms the page cache, so the figures are those of a warm
machine.

Per run it prints ``system/time_to_first_step_s`` as the run logged it to MLflow (from the job's
start to the end of its first optimizer step, measured by the driver's and the worker's clocks)
and the seconds after the start at which the job's output first showed each phase: Ray started,
the run launched, Ray Train's controller up, the worker's process group up, the engine and the
tracker built (the worker's "training ..." line), the first step. (The random start is scored
at the first validation, after the first step; with ``--max-steps 1`` that is the run's end.) Those
phase times are when the lines reached the job's output (Ray forwards worker lines within a
fraction of a second), so they mark phases, not exact instants. Wall times: a busy machine shows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the checkout

# Output that marks the end of each phase before the first step, in the order they happen.
PHASES = [
    ("ray_started", "Started a local Ray instance"),
    ("run_launched", "service.training.launch INFO launching"),
    ("controller_up", "Attempting to start training worker group"),
    ("worker_up", "Setting up process group"),
    ("engine_built", "service.training.pretrain_worker INFO training "),
    ("first_step", "INFO first step "),
]


def timed_run(run_dir: Path, job_args: list[str], timeout_s: float) -> dict[str, Any]:
    """One job run in ``run_dir``: its phase times (s after start), exit status and wall time."""
    seen: dict[str, float] = {}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "pretrain.py"), *job_args], cwd=run_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic() - start
        tail = (tail + [line])[-40:]
        for name, marker in PHASES:
            if name not in seen and marker in line:
                seen[name] = round(now, 2)
        if now > timeout_s:
            proc.kill()
            break
    code = proc.wait()
    if code != 0:
        sys.exit(f"the job failed (exit {code}); its last lines:\n{''.join(tail)}")
    return {"phases_s": seen, "wall_s": round(time.monotonic() - start, 1)}


def logged_time_to_first_step(run_dir: Path) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlruns.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(ids) if "system/time_to_first_step_s" in r.data.metrics]
    if len(runs) != 1:
        sys.exit(f"expected one run with system/time_to_first_step_s in {run_dir}, found {len(runs)}")
    return round(runs[0].data.metrics["system/time_to_first_step_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs (after one untimed warm-up run)")
    parser.add_argument("--max-steps", type=int, default=1, help="train.max_steps of each run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("job_args", nargs="*", help="flags for jobs/pretrain.py (after --)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs} is not allowed: at least 1")
    job_args = ["--train.max_steps", str(args.max_steps), *args.job_args]

    scratch = Path(tempfile.mkdtemp(prefix="convmae-startup-"))
    job_args += ["--data.embedded_dir", str(scratch / "convmae_data")]
    results: list[dict[str, Any]] = []
    try:
        for i in range(args.runs + 1):
            run_dir = scratch / f"run-{i}"
            run_dir.mkdir()
            run = timed_run(run_dir, job_args, args.timeout)
            if i == 0:
                print(f"warm-up run (embedded data generated): {run['wall_s']} s", flush=True)
                continue
            run["time_to_first_step_s"] = logged_time_to_first_step(run_dir)
            results.append(run)
            phases = ", ".join(f"{name} {t}" for name, t in run["phases_s"].items())
            print(f"run {i}: first step after {run['time_to_first_step_s']} s (MLflow); "
                  f"phases (s): {phases}; whole run {run['wall_s']} s", flush=True)
    finally:
        if args.keep:
            print(f"scratch directory: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    firsts = [r["time_to_first_step_s"] for r in results]
    print(f"time to first step over {len(firsts)} runs: median {statistics.median(firsts):.1f} s, "
          f"min {min(firsts):.1f} s, max {max(firsts):.1f} s (job flags: {' '.join(job_args)})")
    if args.json:
        print(json.dumps({"job_args": job_args, "runs": results,
                          "median_time_to_first_step_s": statistics.median(firsts)}))


if __name__ == "__main__":
    main()
