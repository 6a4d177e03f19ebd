"""Loading a model by --model: official checkpoints by file://, HTTP and S3 URLs, MLflow
models:/ and runs:/ URIs from a real tracking server, folders, and random baselines."""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import threading
import uuid

import pytest
import torch

import convmae
from service.models.source import ModelSourceError, infer_config, load_model_source


def tiny(seed: int = 0, **overrides) -> convmae.ConvMAE:
    torch.manual_seed(seed)
    return convmae.build_model("convmae_tiny", img_size=32, **overrides).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def official_checkpoint(model: torch.nn.Module, path) -> None:
    """What the official training scripts save: {'model': official names, 'args': Namespace, ...}."""
    state = convmae.export_official_state_dict(model)
    torch.save({"model": state, "args": argparse.Namespace(model="convvit"), "epoch": 1599}, path)


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A loopback HTTP server over a temporary folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("http")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_official_pretraining_checkpoint_by_path_and_file_url(tmp_path):
    source_model = tiny()
    official_checkpoint(source_model, tmp_path / "convmae_pretrain.pth")
    for uri in (str(tmp_path / "convmae_pretrain.pth"), (tmp_path / "convmae_pretrain.pth").as_uri()):
        loaded = load_model_source(uri)
        assert loaded.kind == "official" and loaded.preset == "convmae_tiny" and loaded.is_pretraining_model
        assert loaded.config.img_size == 32 and loaded.run_id is None
        assert same_weights(loaded.model, source_model)
    x = torch.randn(2, 3, 32, 32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(loaded.model(x, generator=gen())[1], source_model(x, generator=gen())[1])


def test_official_checkpoint_over_http(http_root):
    root, base = http_root
    source_model = tiny(seed=1)
    official_checkpoint(source_model, root / "pretrain.pth")
    loaded = load_model_source(f"{base}/pretrain.pth")
    assert loaded.kind == "official" and same_weights(loaded.model, source_model)
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        load_model_source(f"{base}/missing.pth")


def test_official_checkpoint_from_s3(s3_bucket):
    import fsspec

    source_model = tiny(seed=2)
    with fsspec.open(f"{s3_bucket}/ckpt/convmae_base.pth", "wb") as f:
        official_checkpoint(source_model, f)
    from service.config import StorageConfig
    from service.data import storage_options

    loaded = load_model_source(f"{s3_bucket}/ckpt/convmae_base.pth", storage_options=storage_options(StorageConfig()))
    assert loaded.kind == "official" and same_weights(loaded.model, source_model)


def test_official_fine_tuned_convvit_becomes_a_classifier(tmp_path):
    classifier = convmae.ConvMAEBackbone.from_pretrained(tiny(), num_classes=5).eval()
    torch.nn.init.normal_(classifier.head.weight)
    official_checkpoint(classifier, tmp_path / "convvit_finetuned.pth")
    loaded = load_model_source(str(tmp_path / "convvit_finetuned.pth"))
    assert isinstance(loaded.model, convmae.ConvMAEBackbone) and not loaded.is_pretraining_model
    assert loaded.model.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), classifier(x))


def test_pickled_objects_are_refused_and_bad_sources_are_named(tmp_path):
    torch.save({"model": convmae.export_official_state_dict(tiny()), "hook": uuid.UUID(int=1)},
               tmp_path / "evil.pth")
    with pytest.raises(ModelSourceError, match="never unpickle"):
        load_model_source(str(tmp_path / "evil.pth"))
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        load_model_source(str(tmp_path / "nope.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="neither a save_pretrained model"):
        load_model_source(str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="unknown preset 'convmae_tny'"):
        load_model_source("random:convmae_tny")
    with pytest.raises(ModelSourceError, match="match preset 'convmae_base'"):
        infer_config(tiny().state_dict(), preset="convmae_base")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda meta: meta["config"].update(embed_dims=[32, 48, 100_000]),
     r"config.json: embed_dims\[2\]=100000 is not allowed: a whole number in 1..4096"),
    (lambda meta: meta["config"].update(depths=[1, 1, 100_000], img_size=100_000),
     r"config.json: img_size=100000 is not allowed"),
    (lambda meta: meta.update(architecture="backbone", num_classes=10**9),
     r"config.json: num_classes=1000000000 is not allowed: a whole number in 0..100000"),
    (lambda meta: meta.update(config=[1, 2]), r"config.json: 'config' is \[1, 2\], not a mapping"),
])
def test_a_config_json_with_absurd_sizes_is_refused_before_building(tmp_path, edit, message):
    import json

    folder = convmae.save_pretrained(tiny(), tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelSourceError, match=rf"--model '{folder}': .*{message}"):
        load_model_source(str(folder))
    with pytest.raises(ModelSourceError, match="img_size=1000000 is not allowed"):
        load_model_source("random:convmae_tiny:1000000")


def test_save_pretrained_folder_and_random_baselines(tmp_path):
    model = tiny(seed=3, norm_pix_loss=False)
    convmae.save_pretrained(model, tmp_path / "m")
    loaded = load_model_source(str(tmp_path / "m"))
    assert loaded.kind == "pretrained_dir" and same_weights(loaded.model, model)
    assert loaded.config.norm_pix_loss is False  # from config.json, not guessed
    # random:PRESET:IMG_SIZE with seed s is exactly a pretraining run's starting point.
    baseline = load_model_source("random:convmae_tiny:32", seed=3)
    assert baseline.kind == "random" and baseline.config.img_size == 32
    assert same_weights(baseline.model, tiny(seed=3))
    assert load_model_source("random:convmae_tiny").config.img_size == convmae.convmae_tiny().img_size



def test_the_mae_baseline_loads_from_a_folder_a_state_dict_and_random(tmp_path):
    from service.tracking.pyfunc import ConvMAEPyfunc

    torch.manual_seed(4)
    model = convmae.build_model("mae_tiny").eval()
    convmae.save_pretrained(model, tmp_path / "mae")
    folder = load_model_source(str(tmp_path / "mae"))
    assert isinstance(folder.model, convmae.MAE) and folder.is_pretraining_model and same_weights(folder.model, model)
    assert "MAE" in folder.describe()
    torch.save(model.state_dict(), tmp_path / "mae.pth")  # no config: the preset is inferred from shapes
    inferred = load_model_source(str(tmp_path / "mae.pth"))
    assert inferred.preset == "mae_tiny" and same_weights(inferred.model, model)
    encoder_only = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    with pytest.raises(ModelSourceError, match="plain-ViT MAE baseline"):
        from service.models.source import from_state_dict
        from_state_dict(encoder_only)
    random_start = load_model_source("random:mae_tiny", seed=4)
    assert isinstance(random_start.model, convmae.MAE) and same_weights(random_start.model, model)
    # What a registered model's pyfunc predicts: the pooled embedding, as k-NN and probes use.
    images = torch.randn(2, 3, 64, 64)
    embedding = ConvMAEPyfunc(folder.model).predict(images.numpy())
    assert embedding.shape == (2, 64)


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A tiny model logged to a run and registered on the real server, version 1 aliased."""
    from mlflow import MlflowClient

    from service.tracking import ensure_experiment
    from service.tracking.registry import log_and_register

    model = tiny(seed=4)
    folder = convmae.save_pretrained(model, tmp_path_factory.mktemp("reg") / "convmae")
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, mlflow_server, "model-source-tests")).info.run_id
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    out = log_and_register(folder, tracking_uri=mlflow_server, run_id=run_id, registered_name=name)
    client.set_registered_model_alias(name, "champion", out["version"])
    return {"name": name, "run_id": run_id, "model": model, "version": out["version"]}


@pytest.mark.parametrize("suffix", ["/1", "@champion", "/latest"])
def test_registered_model_by_models_uri_knows_its_run(mlflow_server, registered, suffix, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/elsewhere.db")
    loaded = load_model_source(f"models:/{registered['name']}{suffix}", tracking_uri=mlflow_server)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////nonexistent/elsewhere.db"  # global state untouched
    assert loaded.kind == "mlflow" and loaded.run_id == registered["run_id"]
    assert loaded.tracking_uri == mlflow_server
    assert same_weights(loaded.model, registered["model"])


def test_runs_uri_and_unknown_models(mlflow_server, registered):
    loaded = load_model_source(f"runs:/{registered['run_id']}/model", tracking_uri=mlflow_server)
    assert loaded.run_id == registered["run_id"] and same_weights(loaded.model, registered["model"])
    with pytest.raises(ModelSourceError, match="cannot provide it"):
        load_model_source(f"models:/{registered['name']}@no-such-alias", tracking_uri=mlflow_server)
