"""Checkpoints whose files pass their checksums but whose content is wrong, and what resuming
does with them: a script, run in its own process (DeepSpeed initialises torch.distributed for
the process): ``python3 tests/service/training/content_checkpoints.py OUT_DIR``.

It writes a run of two real checkpoints (a one-worker ZeRO-1 engine of convmae_tiny: steps 2
and 4), then for each case of ``CASES`` a copy of the run whose newest (or every) checkpoint is
damaged that way, its checksums manifest rewritten to match, and resumes each copy with
``service.training.checkpoints.restore`` on the local folder. Prints one JSON line: per case,
the optimizer step resumed from (or the error), and the warnings of the resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from service.runtime.safe_checkpoint import safe_load, write_manifest  # noqa: E402

MODEL_STATES = "ds/mp_rank_00_model_states.pt"
RNG_STATE = "rng/rank_00000.pt"


def _rewrite_model_states(folder: Path, change: Callable[[dict], None]) -> None:
    states = safe_load(folder / MODEL_STATES)
    change(states)
    torch.save(states, folder / MODEL_STATES)


def rng_of_another_type(folder: Path) -> None:
    torch.save({"torch": [1, 2, 3]}, folder / RNG_STATE)


def no_model_weights(folder: Path) -> None:
    _rewrite_model_states(folder, lambda states: states.update(module={}))


def a_weight_of_another_shape(folder: Path) -> None:
    def change(states: dict) -> None:
        name = next(iter(states["module"]))
        states["module"][name] = torch.zeros(3)

    _rewrite_model_states(folder, change)


def train_state_of_another_type(folder: Path) -> None:
    _rewrite_model_states(folder, lambda states: states.update(train_state="step four"))


def no_optimizer_state(folder: Path) -> None:
    """Found only by DeepSpeed's own loading: the model fits, its optimizer partition is empty."""
    shard = next((folder / "ds").glob("*optim_states.pt"))
    states = safe_load(shard)
    states["optimizer_state_dict"] = {}
    torch.save(states, shard)


# case -> (damage, whether every checkpoint gets it, not only the newest)
CASES: dict[str, tuple[Callable[[Path], None] | None, bool]] = {
    "intact": (None, False),
    "rng_of_another_type": (rng_of_another_type, False),
    "no_model_weights": (no_model_weights, False),
    "a_weight_of_another_shape": (a_weight_of_another_shape, False),
    "train_state_of_another_type": (train_state_of_another_type, False),
    "no_optimizer_state": (no_optimizer_state, False),
    "none_loads": (no_model_weights, True),
}
OLDER, NEWER = "checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02"


def _write_run(engine, run: Path) -> None:
    from service.training.checkpoints import STATE_FILE, TrainState

    for name, step in ((OLDER, 2), (NEWER, 4)):
        folder = run / name
        state = asdict(TrainState(optimizer_step=step, micro_step=step, world_size=1, zero_stage=1))
        engine.save(folder, {"train_state": state})
        (folder / "rng").mkdir()
        torch.save({"torch": torch.get_rng_state()}, folder / RNG_STATE)
        (folder / STATE_FILE).write_text(json.dumps(state))
        write_manifest(folder, rank=0, world_size=1)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import pyarrow.fs

    import convmae
    from service.config import PretrainConfig, with_overrides
    from service.runtime.engine import Engine
    from service.training.checkpoints import restore
    from service.training.resume import RunStorage

    cfg = with_overrides(PretrainConfig(), {"dist.zero_stage": 1, "dist.num_workers": 1,
                                            "train.batch_size_per_worker": 2})
    torch.manual_seed(0)
    engine = Engine.build(convmae.build_model("convmae_tiny", img_size=32), cfg, use_gpu=False, precision="fp32",
                          lr=1e-3)
    _write_run(engine, out / "base")
    warnings = Warnings()
    logging.getLogger("service").addHandler(warnings)
    report = {}
    for case, (damage, every) in CASES.items():
        run = shutil.copytree(out / "base", out / case)
        for name in (OLDER, NEWER) if every else (NEWER,):
            if damage is not None:
                damage(run / name)
                write_manifest(run / name, rank=0, world_size=1)
        warnings.messages.clear()
        try:
            state = restore(engine, 0, storage=RunStorage(pyarrow.fs.LocalFileSystem(), str(run)))
            report[case] = {"step": state.optimizer_step if state else None}
        except Exception as exc:
            report[case] = {"error": f"{type(exc).__name__}: {exc}"}
        report[case]["warnings"] = list(warnings.messages)
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
