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


@pytest.mark.parametrize(
    "cls, key, value, allowed",
    [
        # A worker would fail building a 100000-px model (exit 1, a traceback) after the cluster started.
        (PretrainConfig, "model.img_size", 100000, "a multiple of 16 (the patch size of convmae_tiny) in 16..4096"),
        ("FinetuneConfig", "img_size", 8192, "0 (the model's own) or a multiple of 16 in 16..4096"),
        ("EvaluateConfig", "img_size", 4112, "0 (the model's own) or a multiple of 16 in 16..4096"),
        # torch.manual_seed overflows past 64 bits, in the workers; numpy's RandomState past 32.
        (PretrainConfig, "train.seed", 10**20, "a whole number in 0..9223372036854775807 (2**63 - 1)"),
        (PretrainConfig, "train.seed", -1, "a whole number in 0..9223372036854775807 (2**63 - 1)"),
        ("FinetuneConfig", "train.seed", 2**63, "a whole number in 0..9223372036854775807 (2**63 - 1)"),
        ("EvaluateConfig", "seed", 10**20, "a whole number in 0..9223372036854775807 (2**63 - 1)"),
        ("ReconstructConfig", "seed", -5, "a whole number in 0..9223372036854775807 (2**63 - 1)"),
        ("TuneJobConfig", "sweep.seed", 2**32, "a whole number in 0..4294967295 (2**32 - 1)"),
    ],
)
def test_sizes_and_seeds_out_of_what_the_model_and_rngs_take_fail_up_front(cls, key, value, allowed):
    import service.config

    cls = getattr(service.config, cls) if isinstance(cls, str) else cls
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, {key: value})
    assert str(err.value) == f"{key}={value!r} is not allowed: {allowed}"


def test_the_largest_seeds_and_image_size_are_taken():
    from service.config import TuneJobConfig

    load_config(PretrainConfig, None, {"train.seed": 2**63 - 1, "model.img_size": 4096})
    load_config(TuneJobConfig, None, {"sweep.seed": 2**32 - 1})


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

    small = with_overrides(PretrainConfig(), {"model.img_size": 32})  # convmae_tiny: 4 patches of 16x16
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
        ("data.max_image_pixels", 0, "data.max_image_pixels=0 is not allowed: >= 1"),
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


@pytest.mark.parametrize("ratio", [0, 0.0])
def test_mask_ratio_zero_leaves_nothing_to_reconstruct(ratio):
    # At 0 the loss is 0 from the first step: the run would "converge" and register a model
    # that learned nothing.
    with pytest.raises(ConfigError, match=r"model.mask_ratio=0.0 is not allowed: 0 < mask_ratio < 1"):
        load_config(PretrainConfig, None, {"model.mask_ratio": ratio})


@pytest.mark.parametrize("key", ["train.blr", "train.lr", "train.min_lr", "train.weight_decay",
                                 "train.clip_grad", "train.warmup_epochs", "data.min_crop_scale"])
@pytest.mark.parametrize("raw", ["inf", ".inf", "-.inf", "nan", ".NaN", "1.0e400"])
def test_float_settings_must_be_finite(key, raw):
    overrides = parse_cli_overrides([f"--{key}", raw])  # as typed on the command line
    with pytest.raises(ConfigError, match=rf"^{key}=-?(inf|nan) is not allowed: a finite number$"):
        load_config(PretrainConfig, None, overrides)


def test_non_finite_floats_are_refused_inside_tuples_and_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"train.betas=inf is not allowed: a finite number"):
        load_config(PretrainConfig, None, parse_cli_overrides(["--train.betas", "[0.9, .inf]"]))
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  blr: .nan\n")
    with pytest.raises(ConfigError, match=r"train.blr=nan is not allowed"):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", ".hidden", "run name", "run:1", "r\u00e9sum\u00e9",
                                  "-flag", "x" * 129])
def test_run_name_is_one_safe_path_component(name):
    # The run's checkpoints go to checkpoint.storage_path/run_name: '..' would write beside it.
    with pytest.raises(ConfigError, match=r"run_name=.* is not allowed: a single path component"):
        load_config(PretrainConfig, None, {"run_name": name})


def test_good_run_names_pass_and_sweep_names_follow_the_same_rule():
    from service.config import TuneJobConfig

    for name in ("convmae-base-in1k-1600ep", "run_2.v3", "A", "x" * 128):
        assert load_config(PretrainConfig, None, {"run_name": name}).run_name == name
    with pytest.raises(ConfigError, match=r"sweep.name='\.\.' is not allowed: a single path component"):
        load_config(TuneJobConfig, None, {"sweep.name": ".."})
    # Room for the trial id in the trials' run names <sweep.name>-<trial id>.
    with pytest.raises(ConfigError, match=r"sweep.name=.* at most 96 characters"):
        load_config(TuneJobConfig, None, {"sweep.name": "s" * 97})


@pytest.mark.parametrize(("text", "where"), [
    ("train:\n  epochs: 3\n  blr: [1, 2\nmodel:\n  name: x\n", "line 4, column 6"),
    ("train:\n epochs: 3\n  blr: 2\n", "line 3, column 6: mapping values are not allowed here"),
    ("run_name: \"open\n", "line 2, column 1"),
])
def test_malformed_yaml_names_the_file_and_the_line(tmp_path, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{path}' is not valid YAML at {where}"):
        load_config(PretrainConfig, path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read: 'utf-8' codec"):
        load_config(PretrainConfig, path)


def test_a_pretrained_models_registered_name_says_what_it_holds():
    from service.config.jobs import DEFAULT_MODEL

    assert PretrainConfig().registered_name() == "convmae_tiny-96px-digits"
    # The downstream jobs' default is what the zero-flag run registers, and nothing else.
    assert DEFAULT_MODEL == "models:/convmae_tiny-96px-digits/latest"
    own = with_overrides(PretrainConfig(), {"data.url": "s3://bucket/my cats/train", "model.img_size": 64})
    assert own.registered_name() == "convmae_tiny-64px-my-cats"
    named = with_overrides(PretrainConfig(), {"mlflow.registered_model_name": "mine"})
    assert named.registered_name() == "mine"


def test_shipped_configs_of_different_models_register_different_names():
    from pathlib import Path

    from service.config import TuneJobConfig

    root = Path(__file__).resolve().parents[3] / "jobs" / "configs"
    holds: dict[str, set[tuple]] = {}
    configs = [load_config(TuneJobConfig, p).pretrain() for p in root.glob("sweep_*.yaml")]
    configs += [load_config(PretrainConfig, p) for p in root.glob("*.yaml") if not p.name.startswith(("sweep_",
                                                                                                      "finetune_"))]
    configs.append(PretrainConfig())  # the zero-flag run
    for cfg in configs:
        holds.setdefault(cfg.registered_name(), set()).add((cfg.model.name, cfg.model.img_size, cfg.data.url))
    assert len(configs) >= 5
    assert all(len(models) == 1 for models in holds.values()), holds



def test_the_mae_baseline_is_a_pretraining_model_name():
    cfg = load_config(PretrainConfig, None, parse_cli_overrides(["--model.name", "mae_tiny", "--model.img_size", "64"]))
    assert cfg.model.name == "mae_tiny"
    with pytest.raises(ConfigError, match="mae_base, mae_small, mae_tiny"):
        load_config(PretrainConfig, None, {"model.name": "mae_huge"})
    with pytest.raises(ConfigError, match="a multiple of 16"):
        load_config(PretrainConfig, None, {"model.name": "mae_tiny", "model.img_size": 72})
