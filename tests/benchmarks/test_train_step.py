"""benchmarks/train_step.py runs the worker's step and the bare model side by side on CPU and
reports what it promises (keys and sane values; timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
TINY = ["--model", "convmae_tiny", "--img-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--device", "cpu", "--threads", "1", "--json"]


def run_benchmark(*extra: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra], capture_output=True, text=True,
                          timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # DeepSpeed may print lines before it


def test_service_and_bare_side_by_side_in_bf16():
    r = run_benchmark("--precision", "bf16", "--top-ops", "5")
    for key in ("bare_img_per_s", "service_img_per_s", "service_over_bare", "ops_per_step_service",
                "ops_per_step_bare", "mfu"):
        assert key in r, key
    assert r["precision"] == "bf16" and r["model"] == "convmae_tiny" and r["batch_size"] == 2
    assert r["bare_img_per_s"] > 0 and r["service_img_per_s"] > 0 and r["service_over_bare"] > 0
    assert r["ops_per_step_bare"] > 0 and r["ops_per_step_service"] > 0
    assert r["mfu"] is None and r["peak_tflops"] is None  # no peak on CPU
    assert set(r["paths"]) == {"bare", "service"}
    for path in r["paths"].values():
        assert len(path["step_ms_all"]) == 2 and path["host_ms"] > 0 and path["cpu_ms"] > 0
        assert path["device_ms"] is None and path["peak_memory_bytes"] is None  # CPU
        assert path["gflop_per_image"] > 0 and path["tflop_per_s"] > 0
        assert len(path["top_ops"]) == 5 and all(name.startswith("aten::") for name, _ in path["top_ops"])
    # The service's engine runs bf16, with the config the workers get.
    ds = r["deepspeed_config"]
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2


def test_fp32_is_the_cpu_default_and_ds_set_changes_the_engine_config():
    r = run_benchmark("--ds-set", "zero_optimization.stage=1")
    assert r["precision"] == "fp32" and r["compile_service"] is False
    assert r["deepspeed_config"]["zero_optimization"]["stage"] == 1
    assert r["deepspeed_config"]["bf16"]["enabled"] is False
    assert r["ops_per_step_service"] > 0 and r["service_img_per_s"] > 0


def test_op_count_is_the_codes_not_the_core_counts():
    # With two threads CPU cat dispatches view ops per input chunk; the profiled step runs on one.
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from train_step import profile_step

    tensors = [torch.randn(20_000) for _ in range(50)]
    threads = torch.get_num_threads()
    try:
        counts = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            counts[n] = profile_step(lambda: torch.cat(tensors), torch.device("cpu"))["aten_ops"]
            assert torch.get_num_threads() == n  # restored after profiling
    finally:
        torch.set_num_threads(threads)
    assert counts[1] == counts[2] == 1


def test_the_workers_engine_trains_the_mae_baseline():
    # The step pretrain_worker runs (DeepSpeed engine, ZeRO-2), on the plain-ViT MAE preset.
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY[2:], "--model", "mae_tiny"], capture_output=True,
                          text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["model"] == "mae_tiny" and r["service_img_per_s"] > 0 and r["ops_per_step_service"] > 0
    assert r["paths"]["service"]["gflop_per_image"] > 0
