"""Sweep pretraining hyper-parameters (mask ratio, learning rate, ...) with Ray Tune.

Every trial is a full distributed pretraining run (Ray Train + DeepSpeed); ASHA stops bad
trials early on a comparable validation objective; the best trial's model is registered in
MLflow under the alias best-sweep-<name>. With no flags it sweeps the tiny model on the
embedded data set on this machine. An interrupted sweep resumes when run again.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/sweep_base_in1k.yaml

Search-space entries are dotted pretraining keys with a kind and a list, e.g.
    --sweep.space.model.mask_ratio 'grid [0.6, 0.75, 0.9]' --sweep.space.train.blr 'loguniform [1e-4, 1e-3]'
(kinds: grid, choice, uniform, loguniform, randint; giving any entry replaces the default space).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import TuneJobConfig, redact_url  # noqa: E402


def _sweep(config: TuneJobConfig):
    from service.tune.sweep import run_sweep

    result = run_sweep(config)
    if result.interrupted:
        # Tune answers Ctrl+C itself: it stops the trials, saves the sweep's state and returns;
        # the sweep's MLflow run has ended KILLED. The job then ends like any stopped job: one
        # line and exit status 130, and the same command resumes the sweep.
        raise KeyboardInterrupt
    return result


def _report(result, config: TuneJobConfig) -> int:
    print(f"\nsweep {result.name}: objective {result.metric} ({result.mode}), {len(result.trials)} trial(s)")
    print(result.table)
    if result.best is not None:
        print(f"best trial {result.best.trial_id}: {result.metric}={result.best.objective:.4f} {result.best.params}")
    if result.registered_uri:
        print(f"best model: {result.registered_uri} (MLflow {redact_url(result.tracking_uri)})")
    return 0 if result.best is not None else 1


def main(argv: list[str] | None = None) -> int:
    example = "python jobs/tune.py --config jobs/configs/sweep_tiny_cpu.yaml --sweep.searcher tpe --sweep.num_samples 8"
    return run_job("tune.py", __doc__, TuneJobConfig, example, _sweep, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
