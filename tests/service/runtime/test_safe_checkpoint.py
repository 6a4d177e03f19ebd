"""Loading never executes code, checkpoints know when they are damaged, and real DeepSpeed
checkpoints of every ZeRO stage still load (weights-only, with the allow-list)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.runtime.safe_checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    allowed_global_names,
    check_loadable,
    safe_load,
    verify_checkpoint,
    verify_manifests,
    weights_only_loads,
    write_manifest,
)

HERE = Path(__file__).resolve().parent


class Payload:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(folder: Path, marker: Path, name: str = "ds/mp_rank_00_model_states.pt") -> Path:
    """The reproduction of the issue: ``{'module': {}, 'x': Payload()}`` as DeepSpeed model states."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}, "x": Payload(marker)}, path)
    return path


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The threat is real: plain torch.load (weights_only=False) runs it."""
    marker = tmp_path / "MARKER"
    path = plant_payload(tmp_path / "evil", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_the_payload_is_refused_naming_file_and_global(tmp_path):
    marker = tmp_path / "MARKER"
    path = plant_payload(tmp_path / "evil", marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    assert str(path) in str(err.value) and "posix.system" in str(err.value)
    assert isinstance(err.value, ValueError) and err.value.globals == ["posix.system"]
    with pytest.raises(UnsafeCheckpointError, match=r"evil/ds/mp_rank_00_model_states\.pt: it needs posix\.system"):
        check_loadable(tmp_path / "evil", label="evil")
    with open(path, "rb") as f, pytest.raises(UnsafeCheckpointError, match="stream.pt: it needs posix.system"):
        safe_load(f, name="stream.pt")
    assert not marker.exists()


def test_forced_weights_only_overrides_an_explicit_weights_only_false(tmp_path):
    """What DeepSpeed's engine.load_checkpoint and zero_to_fp32 do inside: torch.load(weights_only=False)."""
    marker = tmp_path / "MARKER"
    path = plant_payload(tmp_path / "evil", marker)
    before = set(torch.serialization.get_safe_globals())
    env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"), weights_only_loads():
        torch.load(path, weights_only=False)
    assert not marker.exists()
    # Everything is put back: the allow-list and the environment.
    assert set(torch.serialization.get_safe_globals()) == before
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == env
    with weights_only_loads():  # nested contexts keep the allow-list until the outer one ends
        with weights_only_loads():
            pass
        assert set(allowed_global_names()) <= {f"{g.__module__}.{g.__qualname__}"
                                               for g in torch.serialization.get_safe_globals()}


def test_plain_tensors_and_containers_load(tmp_path):
    torch.save({"w": torch.arange(3), "meta": {"step": 4, "names": ["a"]}}, tmp_path / "ok.pt")
    loaded = safe_load(tmp_path / "ok.pt")
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["meta"] == {"step": 4, "names": ["a"]}


def test_a_truncated_file_is_damaged_not_unsafe(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError, match="w.pt is damaged"):
        safe_load(tmp_path / "w.pt")


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    (root / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(4)}}, root / "ds" / "mp_rank_00_model_states.pt")
    (root / "train_state.json").write_text(json.dumps({"optimizer_step": 4}))
    return root


def test_manifests_of_all_ranks_verify_an_intact_folder(tmp_path):
    root = _folder(tmp_path)
    write_manifest(root, rank=0, world_size=2)
    with pytest.raises(DamagedCheckpointError, match=r"rank\(s\) \[1\] of 2 are missing"):
        verify_manifests(root)
    # rank 1 wrote its own shard in its own folder; Ray merged both into one.
    other = tmp_path / "rank1"
    other.mkdir()
    torch.save({"opt": torch.zeros(2)}, other / "shard1.pt")
    write_manifest(other, rank=1, world_size=2)
    (root / "ds" / "shard1.pt").write_bytes((other / "shard1.pt").read_bytes())
    (root / "checksums" / "rank_00001.json").write_bytes((other / "checksums" / "rank_00001.json").read_bytes())
    with pytest.raises(DamagedCheckpointError, match="shard1.pt is missing"):
        verify_manifests(root)  # rank 1 listed it at its folder's top level, not under ds/
    (root / "ds" / "shard1.pt").rename(root / "shard1.pt")
    assert verify_manifests(root) == 3
    verify_checkpoint(root)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "mp_rank_00_model_states.pt has"),
    ("flip", "mp_rank_00_model_states.pt does not match its checksum"),
    ("delete", "mp_rank_00_model_states.pt is missing"),
    ("extra", "no manifest lists: ds/extra_model_states.pt"),
    ("no_manifest", "has no checksums manifest"),
    ("garbled_manifest", "manifest checksums/rank_00000.json is unreadable"),
])
def test_damaged_or_incomplete_folders_are_named(tmp_path, damage, message):
    root = _folder(tmp_path)
    write_manifest(root)
    states = root / "ds" / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
    elif damage == "delete":
        states.unlink()
    elif damage == "extra":
        torch.save({}, root / "ds" / "extra_model_states.pt")
    elif damage == "no_manifest":
        (root / "checksums" / "rank_00000.json").unlink()
    elif damage == "garbled_manifest":
        (root / "checksums" / "rank_00000.json").write_text("{not json")
    with pytest.raises(DamagedCheckpointError, match=message) as err:
        verify_checkpoint(root, label="s3://bucket/run/checkpoint_1")
    assert "checkpoint s3://bucket/run/checkpoint_1 is damaged or incomplete" in str(err.value)


def test_a_payload_with_a_matching_manifest_is_still_refused(tmp_path):
    """Whoever can write the folder can rewrite its checksums too: the loader is the guard."""
    marker = tmp_path / "MARKER"
    root = _folder(tmp_path)
    plant_payload(root, marker)
    write_manifest(root)
    verify_manifests(root)
    with pytest.raises(UnsafeCheckpointError, match="ckpt/ds/mp_rank_00_model_states.pt: it needs posix.system"):
        verify_checkpoint(root)
    assert not marker.exists()


@pytest.fixture(scope="module")
def deepspeed_checkpoints(tmp_path_factory):
    """Real ZeRO 0-3 checkpoints, each already loaded back by a fresh engine in a child process."""
    out = tmp_path_factory.mktemp("deepspeed")
    proc = subprocess.run([sys.executable, str(HERE / "deepspeed_checkpoints.py"), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_deepspeed_writes_only_allow_listed_types_and_every_zero_stage_resumes(deepspeed_checkpoints):
    _, report = deepspeed_checkpoints
    allowed = set(allowed_global_names())
    for stage, found in report.items():
        assert set(found["unsafe_globals"]) <= allowed, f"ZeRO-{stage} writes types outside the allow-list"
        assert found["loaded"] and found["same_weights"], f"ZeRO-{stage} did not load back weights-only"
        assert found["client_state"] == {"optimizer_step": 1}
    # What the allow-list is there for: the ZeRO optimizer shards need these types.
    assert set(report["2"]["unsafe_globals"]) == {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_folders_consolidate_weights_only(deepspeed_checkpoints, stage):
    from service.runtime.engine import consolidated_state_dict

    out, _ = deepspeed_checkpoints
    folder = out / f"zero{stage}"
    verify_checkpoint(folder)
    expected = safe_load(out / f"zero{stage}.expected.pt")
    state = consolidated_state_dict(folder)
    assert state.keys() >= expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    if stage:  # without the allow-list, torch's weights-only loader refuses DeepSpeed's optimizer shards
        shard = next((folder / "ds").glob("*optim_states.pt"))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(shard, weights_only=True)


def test_a_damaged_deepspeed_folder_is_refused_as_a_model_source(deepspeed_checkpoints, tmp_path):
    import shutil

    from service.models.source import load_model_source

    out, _ = deepspeed_checkpoints
    folder = shutil.copytree(out / "zero1", tmp_path / "zero1")
    loaded = load_model_source(str(folder))
    assert loaded.kind == "deepspeed"
    shard = next((folder / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="optim_states.pt has"):
        load_model_source(str(folder))
