"""Registering a checkpoint's model in a real MLflow server: once per checkpoint, never fatal."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import convmae
from service.tracking.registry import CHECKPOINT_TAG, load_model, register_checkpoint_once
from tests.fixtures.mlflow_server import env_without_mlflow_uris, register_tiny_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def run(mlflow_server):
    from mlflow import MlflowClient

    from service.tracking import ensure_experiment

    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, mlflow_server, "registry-tests")).info.run_id
    return client, run_id, f"reg-{uuid.uuid4().hex[:8]}"


def weights_digest(model: torch.nn.Module) -> str:
    """One hash of every tensor of ``model``, in key order."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_of(folder):
    from ray.train import Checkpoint

    folder.mkdir(parents=True)
    (folder / "marker.txt").write_text(folder.name)
    return Checkpoint.from_directory(str(folder))


def exporter(calls):
    def export(folder, tmp):
        calls.append((folder / "marker.txt").read_text())  # sees the checkpoint's own files
        torch.manual_seed(len(calls))
        return convmae.save_pretrained(convmae.build_model("convmae_tiny", img_size=32), tmp / "convmae")

    return export


def register(mlflow_server, run_id, name, checkpoint, export):
    return register_checkpoint_once(checkpoint, export, tracking_uri=mlflow_server, run_id=run_id,
                                    registered_name=name, tags={"data": "memory://x"}, metadata={})


def test_a_checkpoint_is_registered_once_and_a_new_one_gets_a_new_version(mlflow_server, run, tmp_path):
    client, run_id, name = run
    calls = []
    first = checkpoint_of(tmp_path / "ckpt_a")
    out = register(mlflow_server, run_id, name, first, exporter(calls))
    assert out["registered_uri"] == f"models:/{name}/1"
    version = client.get_model_version(name, "1")
    assert version.tags[CHECKPOINT_TAG] == first.path and version.tags["data"] == "memory://x"

    # Running a finished job again hands over the same checkpoint: same version, no export.
    again = register(mlflow_server, run_id, name, first, exporter(calls))
    assert again["registered_uri"] == f"models:/{name}/1" and again["version"] == "1"
    assert calls == ["ckpt_a"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    out = register(mlflow_server, run_id, name, checkpoint_of(tmp_path / "ckpt_b"), exporter(calls))
    assert out["registered_uri"] == f"models:/{name}/2" and calls == ["ckpt_a", "ckpt_b"]
    assert isinstance(load_model(out["registered_uri"], tracking_uri=mlflow_server), convmae.ConvMAE)


def test_a_failing_export_is_a_warning_not_an_error(mlflow_server, run, tmp_path, caplog):
    _, run_id, name = run

    def broken(folder, tmp):
        raise RuntimeError("shards missing")

    out = register(mlflow_server, run_id, name, checkpoint_of(tmp_path / "ckpt"), broken)
    assert out == {"registered_uri": None, "model_uri": None, "version": None}
    assert "shards missing" in caplog.text and str(tmp_path / "ckpt") in caplog.text


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_load_model_in_a_fresh_process_honours_its_uri_and_writes_nothing_to_the_cwd(store, mlflow_server,
                                                                                   tmp_path, monkeypatch):
    # MLflow resolves models:/ through its global registry URI: without MLFLOW_TRACKING_URI it
    # looked in (and created) ./mlflow.db and found no such model.
    uri = mlflow_server if store == "server" else f"sqlite:///{tmp_path}/store/mlruns.db"
    (tmp_path / "store").mkdir()
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    run_id = register_tiny_model(uri, name, tmp_path, monkeypatch)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from service.tracking.registry import load_model\n"
            "from tests.service.tracking.test_registry import weights_digest\n"
            "for model_uri in sys.argv[3:]:\n"
            "    model = load_model(model_uri, tracking_uri=sys.argv[2])\n"
            "    print(model_uri, type(model).__name__, model.config.img_size, weights_digest(model))\n")
    uris = [f"models:/{name}/1", f"models:/{name}@champion", f"models:/{name}/latest", f"runs:/{run_id}/model"]
    out = subprocess.run([sys.executable, "-c", code, str(REPO), uri, *uris], cwd=cwd, env=env_without_mlflow_uris(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # Each URI loads the very weights that were registered (register_tiny_model saved them here).
    registered = weights_digest(convmae.load_pretrained(tmp_path / "convmae"))
    assert out.stdout.split() == [w for u in uris for w in (u, "ConvMAE", "32", registered)]
    assert list(cwd.iterdir()) == []  # no mlflow.db, no mlruns


# ---------------------------------------------------------------- artifacts are data only


@pytest.fixture()
def local_model(tmp_path, monkeypatch):
    """A tiny model registered in a sqlite store whose artifacts are a local folder (the
    artifact store a test can write to as an intruder would); (tracking URI, model root)."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    name = f"data-only-{uuid.uuid4().hex[:8]}"
    (tmp_path / "weights").mkdir()
    register_tiny_model(uri, name, tmp_path / "weights", monkeypatch)
    [mlmodel] = [p for p in tmp_path.rglob("MLmodel") if "weights" not in p.parts]
    return uri, f"models:/{name}/1", mlmodel.parent


def test_a_registered_model_holds_data_only_and_loads_through_the_installed_package(local_model):
    import mlflow.pyfunc
    import numpy as np
    import yaml

    from service.tracking.registry import load_pyfunc

    uri, model_uri, root = local_model
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert "data/convmae/model.safetensors" in files and "data/convmae/config.json" in files
    assert not [f for f in files if f.endswith((".py", ".pyc", ".pkl", ".pickle")) or "pickle" in f], files
    pyfunc = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "service.tracking.pyfunc" and not pyfunc.get("code")
    assert "python_model" not in pyfunc and "cloudpickle_version" not in pyfunc

    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    expected = convmae.encoder_embedding(load_model(model_uri, tracking_uri=uri).eval(), torch.from_numpy(images))
    for loaded in (mlflow.pyfunc.load_model(model_uri), load_pyfunc(model_uri, tracking_uri=uri)):
        assert np.allclose(loaded.predict(images), expected.detach().numpy(), atol=1e-5)


PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def plant_code(root: Path, marker: Path) -> None:
    """What an intruder in the artifact store would do: Python files beside the weights and an
    MLmodel that names them as the loader, with a code folder MLflow puts on sys.path."""
    import yaml

    (root / "code").mkdir()
    (root / "code" / "intruder_loader.py").write_text(
        PAYLOAD.format(marker=str(marker)) + "def _load_pyfunc(data_path):\n    return None\n")
    (root / "data" / "convmae" / "__init__.py").write_text(PAYLOAD.format(marker=str(marker)))
    meta = yaml.safe_load((root / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(loader_module="intruder_loader", code="code")
    (root / "MLmodel").write_text(yaml.safe_dump(meta))


def test_code_planted_in_the_artifact_store_is_never_run_on_load(local_model, tmp_path):
    from service.models.source import ModelSourceError
    from service.tracking.registry import load_pyfunc

    uri, model_uri, root = local_model
    marker = tmp_path / "MARKER"
    plant_code(root, marker)
    assert isinstance(load_model(model_uri, tracking_uri=uri), convmae.ConvMAE)  # reads JSON + safetensors only
    with pytest.raises(ModelSourceError) as refused:
        load_pyfunc(model_uri, tracking_uri=uri)
    assert "loader_module='intruder_loader'" in str(refused.value) and "code='code'" in str(refused.value)
    assert not marker.exists(), "the planted code ran"


def test_loading_a_registered_model_leaves_nothing_in_the_temp_directory(mlflow_server, run, tmp_path, monkeypatch):
    """It left a convmae-model-* download behind at every call."""
    import tempfile

    _, run_id, name = run
    out = register(mlflow_server, run_id, name, checkpoint_of(tmp_path / "ckpt"), exporter([]))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert isinstance(load_model(out["registered_uri"], tracking_uri=mlflow_server), convmae.ConvMAE)
    assert list(temp.iterdir()) == []


def test_the_mae_baseline_registers_and_loads_back(mlflow_server, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from service.tracking import ensure_experiment
    from service.tracking.registry import log_and_register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, mlflow_server, "registry-tests")).info.run_id
    torch.manual_seed(0)
    model = convmae.build_model("mae_tiny", img_size=32)
    folder = convmae.save_pretrained(model, tmp_path / "convmae")  # named as export_checkpoint names it
    name = f"mae-{uuid.uuid4().hex[:8]}"
    out = log_and_register(folder, tracking_uri=mlflow_server, run_id=run_id, registered_name=name)
    loaded = load_model(f"models:/{name}/{out['version']}", tracking_uri=mlflow_server)
    assert isinstance(loaded, convmae.MAE) and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    images = torch.randn(2, 3, 32, 32)
    embedding = mlflow.pyfunc.load_model(f"models:/{name}/{out['version']}").predict(images.numpy())
    torch.testing.assert_close(torch.as_tensor(embedding), convmae.encoder_embedding(model.eval(), images))
