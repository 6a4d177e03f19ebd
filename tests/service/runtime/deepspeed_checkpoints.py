"""Writes real DeepSpeed checkpoints (ZeRO 0-3, one CPU process over gloo) and loads each back
into a fresh engine the way a resuming worker does: weights-only, with the allow-list.

Run as a script in its own process (DeepSpeed initialises torch.distributed for the process):
``python3 tests/service/deepspeed_checkpoints.py OUT_DIR``. For each stage S it leaves
``OUT_DIR/zeroS`` (a checkpoint folder as our runs write them: ``ds/`` shards, manifest) and
``OUT_DIR/zeroS.expected.pt`` (the engine's fp32 weights after the step, plain tensors), and
prints one JSON line: per stage, the globals outside torch's default weights-only set found in
its files, and whether a fresh engine loaded it back to the same weights and optimizer state.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main(out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    import convmae
    from service.config import PretrainConfig, with_overrides
    from service.runtime.engine import Engine
    from service.runtime.safe_checkpoint import weights_only_loads, write_manifest

    report = {}
    for stage in (0, 1, 2, 3):
        cfg = with_overrides(PretrainConfig(), {"dist.zero_stage": stage, "dist.num_workers": 1,
                                                "train.batch_size_per_worker": 2, "train.clip_grad": 1.0})

        def engine(seed: int, cfg=cfg):
            torch.manual_seed(seed)
            model = convmae.build_model("convmae_tiny", img_size=32)
            return Engine.build(model, cfg, use_gpu=False, precision="fp32", lr=1e-3).ds_engine

        trained = engine(0)
        loss, _, _ = trained(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        trained.backward(loss)
        trained.step()
        folder = out / f"zero{stage}"
        trained.save_checkpoint(str(folder), tag="ds", client_state={"train_state": {"optimizer_step": 1}})
        write_manifest(folder)
        expected = {k: v.detach().float().clone() for k, v in _fp32_weights(trained, stage).items()}
        torch.save(expected, out / f"zero{stage}.expected.pt")
        unsafe = sorted({g for f in sorted((folder / "ds").glob("*.pt"))
                         for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)})

        fresh = engine(1)
        with weights_only_loads():
            load_path, client_state = fresh.load_checkpoint(str(folder), tag="ds")
        loaded = {k: v.detach().float() for k, v in _fp32_weights(fresh, stage).items()}
        same_weights = loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
        report[stage] = {"unsafe_globals": unsafe, "loaded": load_path is not None,
                         "client_state": client_state.get("train_state"), "same_weights": same_weights}
    print(json.dumps(report))


def _fp32_weights(engine, stage: int) -> dict:
    if stage == 3:  # parameters are partitioned: gather them
        import deepspeed

        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.detach().clone() for k, p in params.items()}
    return {k: p.detach().clone() for k, p in engine.module.named_parameters()}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
