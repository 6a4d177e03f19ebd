import pytest

from service.config import (
    ConfigError,
    PretrainConfig,
    flatten,
    load_config,
    parse_cli_overrides,
    with_overrides,
)


def test_defaults_validate_and_flatten_to_dotted_keys():
    cfg = PretrainConfig().validate()
    flat = flatten(cfg)
    assert flat["train.blr"] == cfg.train.blr
    assert flat["model.name"] == "convmae_tiny"
    assert flat["train.betas"] == [0.9, 0.95]


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.001\ndist:\n  num_workers: 2\n")
    overrides = parse_cli_overrides(["--train.epochs", "9", "--dist.use_gpu=false", "--train.betas", "[0.8, 0.9]"])
    cfg = load_config(PretrainConfig, path, overrides)
    assert cfg.train.epochs == 9  # CLI beats YAML
    assert cfg.train.lr == 0.001  # YAML beats defaults
    assert cfg.dist.num_workers == 2
    assert cfg.dist.use_gpu is False
    assert cfg.train.betas == (0.8, 0.9)


def test_learning_rate_follows_the_linear_scaling_rule():
    cfg = with_overrides(PretrainConfig(), {"train.blr": 1.5e-4, "train.batch_size_per_worker": 128,
                                            "dist.num_workers": 24, "train.grad_accum_steps": 1})
    assert cfg.effective_batch_size == 3072
    assert cfg.learning_rate == pytest.approx(1.5e-4 * 3072 / 256)
    assert with_overrides(cfg, {"train.lr": 0.01}).learning_rate == 0.01


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("model.name", "convmae_giant", "convmae_giant"),
        ("model.mask_ratio", 1.5, "mask_ratio=1.5"),
        ("dist.zero_stage", 4, "zero_stage=4"),
        ("dist.precision", "fp8", "fp8"),
        ("model.img_size", 40, "multiple of 16"),
        ("train.batch_size_per_worker", 0, "batch_size_per_worker=0"),
    ],
)
def test_bad_values_fail_naming_the_value_and_what_is_allowed(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(PretrainConfig, None, {key: value})
    assert key.split(".")[-1] in str(err.value)


def test_unknown_keys_and_bad_types_are_rejected():
    with pytest.raises(ConfigError, match="train.learning_rat"):
        load_config(PretrainConfig, None, {"train.learning_rat": 1})
    with pytest.raises(ConfigError, match="'many' is not a valid int"):
        load_config(PretrainConfig, None, {"train.epochs": "many"})
    with pytest.raises(ConfigError, match="needs a value"):
        parse_cli_overrides(["--train.epochs"])


def test_cpu_training_refuses_half_precision():
    with pytest.raises(ConfigError, match="fp32"):
        load_config(PretrainConfig, None, {"dist.use_gpu": False, "dist.precision": "bf16"})


def test_shipped_presets_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "jobs" / "configs"
    presets = sorted(root.glob("*.yaml"))
    assert presets, "no presets shipped"
    from service.config import FinetuneConfig, TuneJobConfig

    job_configs = {"finetune_": FinetuneConfig, "sweep_": TuneJobConfig}  # by file name prefix
    for preset in presets:
        cls = next((c for prefix, c in job_configs.items() if preset.name.startswith(prefix)), PretrainConfig)
        cfg = load_config(cls, preset)
        assert cfg.run_name
    base = load_config(PretrainConfig, root / "convmae_base_in1k.yaml")
    assert base.model.name == "convmae_base" and base.effective_batch_size == 3072


def test_mask_ratio_must_leave_the_encoder_a_visible_patch():
    from service.config import ConfigError

    small = PretrainConfig()  # convmae_tiny at 32 px: 4 patches of 16x16
    with_overrides(small, {"model.mask_ratio": 0.75}).validate()  # 1 visible
    with pytest.raises(ConfigError, match=r"model.mask_ratio=0.9 is not allowed: at most 0.75 at model.img_size=32"):
        with_overrides(small, {"model.mask_ratio": 0.9}).validate()
    with pytest.raises(ConfigError, match=r"train.eval_mask_ratio=0.8 is not allowed"):
        with_overrides(small, {"train.eval_mask_ratio": 0.8}).validate()
    with_overrides(small, {"model.mask_ratio": 0.9, "model.img_size": 64}).validate()  # 16 patches: 1 visible


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("dist.gpus_per_worker", 0, "gpus_per_worker=0"),
        ("dist.offload_optimizer", True, "zero_stage >= 1"),
        ("checkpoint.storage_path", "", "a local path or URL"),
        ("train.max_steps", 0, "max_steps=0"),
    ],
)
def test_pretraining_and_fine_tuning_check_their_shared_keys_alike(key, value, fragment):
    from service.config import FinetuneConfig

    overrides = {key: value, "dist.zero_stage": 0} if key == "dist.offload_optimizer" else {key: value}
    for job_config in (PretrainConfig, FinetuneConfig):
        with pytest.raises(ConfigError, match=fragment):
            load_config(job_config, None, overrides)
    with pytest.raises(ConfigError, match="fp32"):
        load_config(FinetuneConfig, None, {"dist.use_gpu": False, "dist.precision": "bf16"})
