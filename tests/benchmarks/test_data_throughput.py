"""benchmarks/data_throughput.py runs end to end on a few small images and reports what it
promises (keys and sane values; timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


def test_per_core_reference_epoch_and_gpu_figures_in_json():
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "48", "--source-size", "96x72",
                           "--img-size", "32", "--batch-size", "8", "--max-workers", "1", "--skip-s3",
                           "--decode-images", "16", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["ours_per_core"] > 0 and r["reference_per_core"] > 0 and r["reference_unbatched_per_core"] > 0
    assert abs(r["ours_over_reference"] - r["ours_per_core"] / r["reference_per_core"]) < 0.01
    assert 0 < r["epoch_over_steady"] and r["first_batch_s"] > 0 and r["epoch_workers"] == 1
    assert (r["gpu_decode_img_per_s"] is None) == (not torch.cuda.is_available())
    assert r["epoch_over_steady_first_epoch"] > 0 and r["first_batch_first_epoch_s"] > 0
    settings = [(row["source"], row["setting"]) for row in r["rows"]]
    assert settings == [("disk", "raw read, no decode"), ("disk", "0 workers, epoch 0"),
                        ("disk", "1 workers, epoch 0"), ("disk", "1 workers, epoch 1")]
    assert "per core, 16 images, same crops" in done.stdout
