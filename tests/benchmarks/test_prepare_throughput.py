"""benchmarks/prepare_throughput.py runs end to end on a few small images and reports what it
promises (every setting, the same images in each; timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prepare_throughput.py"


@pytest.mark.slow  # starts its own Ray cluster: ~90 s on 2 shared cores
def test_one_process_and_workers_with_and_without_max_side_in_json():
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "24", "--source-size", "96x72",
                           "--workers", "2", "--max-side", "32", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(row["workers"], row["max_side"]) for row in r["rows"]] == [(1, None), (2, None), (1, 32), (2, 32)]
    assert all(row["images"] == 24 and row["img_per_s"] > 0 and row["imagenet_hours"] > 0 for row in r["rows"])
    assert set(r["speedup"]) == {"max_side=None", "max_side=32"}
    assert "ImageNet-1k" in done.stdout
