"""DeepSpeed sharded checkpoints, persisted and restored through Ray Train.

Every worker writes its own ZeRO shards into a local folder and reports it; Ray Train merges
the folders of all workers into one checkpoint in the run's storage (local or s3://) and keeps
the last K. Restoring downloads that checkpoint on every worker and loads model, optimizer,
the training position (epoch, batches consumed, step) and each rank's RNG state.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DS_TAG = "ds"  # one tag per checkpoint folder: Ray gives every checkpoint its own folder
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training stands; restored exactly on resume."""

    epoch: int = 0
    optimizer_step: int = 0  # completed optimizer steps over the whole run
    micro_step: int = 0  # completed micro-batches over the whole run
    micro_in_epoch: int = 0  # micro-batches consumed in ``epoch``
    samples_seen: int = 0  # images consumed, all workers together
    loader_state: dict[str, Any] | None = None  # position inside ``epoch``
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


def save(engine: Any, state: TrainState, metrics: dict[str, Any], rank: int) -> None:
    """Writes this worker's shards and reports the checkpoint (a barrier across workers)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="convmae-ckpt-") as tmp:
        root = Path(tmp)
        engine.save_checkpoint(str(root), tag=DS_TAG, client_state={"train_state": asdict(state)})
        (root / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, root / _rng_file(rank))
        if rank == 0:
            (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(root)))


def restore(engine: Any, rank: int) -> TrainState | None:
    """Loads the latest checkpoint Ray Train hands this worker, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        load_path, client_state = engine.load_checkpoint(folder, tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state under tag {DS_TAG!r}")
        rng_path = Path(folder) / _rng_file(rank)
        if rng_path.exists():
            torch.set_rng_state(torch.load(rng_path, weights_only=True)["torch"])
    state = TrainState(**client_state["train_state"])
    log.info("resumed from %s at epoch %d, step %d", checkpoint.path, state.epoch, state.optimizer_step)
    return state


def read_train_state(folder: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))


def consolidated_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights from a (possibly ZeRO-sharded) checkpoint folder."""
    folder = Path(folder)
    tag_dir = folder / DS_TAG
    # ZeRO-3 names them zero_pp_rank_R_mp_rank_00_model_states.pt, other stages mp_rank_00_...
    files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed model states under {tag_dir}")
    # Our own checkpoint (trusted): DeepSpeed pickles its config and shapes beside the tensors.
    model_states = torch.load(files[0], map_location="cpu", weights_only=False)
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage > 0:  # fp32 master weights are spread over the ranks' optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG))
        # ZeRO-1 does not record frozen parameters (our fixed sin-cos position embeddings) in
        # its optimizer shards; below ZeRO-3 the module states hold them whole.
        for key, value in model_states["module"].items():
            if key not in state and value.numel() > 0:
                state[key] = value
    else:
        state = model_states["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
