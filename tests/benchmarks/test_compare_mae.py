"""benchmarks/compare_mae.py runs end to end at a tiny size and prints its table and JSON
(which model wins is not asserted: that is what the benchmark is for)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_mae.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[1])


@pytest.mark.slow  # about 1.5 min on the shared 2-core machine: data, FLOP counts, 4 tiny runs
def test_tiny_comparison_prints_a_table_with_equal_flop_budgets():
    done = run("--seeds", "2", "--epochs", "0.5", "--img-size", "32", "--limit", "128", "--batch-size", "16",
               "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    budget, rows = result["budget"], result["rows"]
    assert [r["model"] for r in rows] == ["convmae_tiny", "mae_tiny"] and budget["train_images"] == 128
    for row in rows:
        assert row["seeds"] == 2 and row["steps"] >= 1
        # The same FLOPs for each: steps x batch x FLOPs per image is the budget, to one step.
        spent = row["steps"] * budget["batch_size"] * budget["flops_per_image"][row["model"]]
        assert abs(spent - budget["total_flops"]) <= budget["batch_size"] * budget["flops_per_image"][row["model"]]
        for key in ("knn", "probe", "random_knn", "random_probe"):
            assert 0.0 <= row[key] <= 1.0 and row[key + "_std"] >= 0.0
    assert len(result["runs"]) == 4
    assert "| model | params | MFLOP/img | steps |" in done.stdout
    assert "| convmae_tiny |" in done.stdout and "| mae_tiny |" in done.stdout
    assert "Equal pretraining FLOPs" in done.stdout


def test_an_unknown_model_is_refused_naming_it(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_mae", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--models", "convmae_tiny,vit_tiny"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'vit_tiny' is not a preset" in err and "mae_tiny" in err
