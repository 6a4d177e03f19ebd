"""The sweep's config, search space, objective and resource arithmetic (no cluster needed)."""

from __future__ import annotations

import pytest

from service.config import (
    ConfigError,
    TuneJobConfig,
    load_config,
    parse_cli_overrides,
    with_overrides,
)
from service.config.sweep import DEFAULT_SPACE, parse_dimension, parse_space
from service.tune.space import concurrent_trials, param_space, resolve_objective, trial_resources
from service.tune.sweep import TrialSummary, format_table


def job(**overrides) -> TuneJobConfig:
    return with_overrides(TuneJobConfig(), overrides)


def test_default_config_is_valid_and_sweeps_mask_ratio_and_lr():
    cfg = TuneJobConfig().validate()
    assert cfg.sweep.space == DEFAULT_SPACE
    assert [d.key for d in parse_space(cfg)] == ["model.mask_ratio", "train.blr"]
    assert cfg.alias == "best-sweep-convmae-sweep"
    assert cfg.pretrain().run_name == cfg.run_name  # the pretraining part is a plain PretrainConfig
    assert type(cfg.pretrain()).__name__ == "PretrainConfig"


@pytest.mark.parametrize(
    ("spec", "kind", "args"),
    [
        ("grid [0.6, 0.75, 0.9]", "grid", (0.6, 0.75, 0.9)),
        ("choice [1, 2]", "choice", (1, 2)),
        ("uniform [0.5, 0.9]", "uniform", (0.5, 0.9)),
        ("loguniform [1e-4, 1e-3]", "loguniform", (1e-4, 1e-3)),
        ("randint [1, 4]", "randint", (1, 4)),
    ],
)
def test_dimensions_parse(spec, kind, args):
    dim = parse_dimension("train.blr", spec)
    assert (dim.kind, dim.args) == (kind, args)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("normal [0, 1]", "unknown kind 'normal'"),
        ("grid []", "non-empty list"),
        ("grid 0.5", "non-empty list"),
        ("uniform [0.9, 0.5]", "low < high"),
        ("uniform [0.1]", "low < high"),
        ("loguniform [0, 1]", "low > 0"),
        ("randint [1.5, 4]", "integer bounds"),
    ],
)
def test_bad_dimensions_name_the_value_and_what_is_allowed(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_dimension("model.mask_ratio", spec)
    assert message in str(err.value)
    assert "sweep.space.model.mask_ratio" in str(err.value)


def test_space_keys_and_values_are_checked_against_the_training_config():
    with pytest.raises(ConfigError, match="'train.nope' is not a sweepable"):
        job(**{"sweep.space": {"train.nope": "grid [1]"}}).validate()
    with pytest.raises(ConfigError, match="'run_name' is not a sweepable"):
        job(**{"sweep.space": {"run_name": "grid [a, b]"}}).validate()
    # mask_ratio must be < 1: the bad grid value is named with the rule it breaks
    with pytest.raises(ConfigError, match=r"sweep.space.model.mask_ratio: value 1.0 .*0 < mask_ratio < 1"):
        job(**{"sweep.space": {"model.mask_ratio": "grid [0.75, 1.0]"}}).validate()
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        job(**{"sweep.space": {}}).validate()


def test_cli_space_entries_nest_like_any_dotted_key_and_merge_with_the_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  space:\n    model.mask_ratio: grid [0.6, 0.9]\n")
    overrides = parse_cli_overrides(["--sweep.space.train.blr", "loguniform [1e-4, 1e-3]",
                                     "--sweep.space.model.mask_ratio=grid [0.5, 0.7]"])
    cfg = load_config(TuneJobConfig, path, overrides)
    assert cfg.sweep.space == {"model.mask_ratio": "grid [0.5, 0.7]", "train.blr": "loguniform [1e-4, 1e-3]"}


def test_searcher_and_scheduler_settings_are_validated():
    with pytest.raises(ConfigError, match="sweep.searcher='bayes' is not allowed: one of random, grid, tpe"):
        job(**{"sweep.searcher": "bayes"}).validate()
    with pytest.raises(ConfigError, match="grid needs grid/choice dimensions only, but train.blr"):
        job(**{"sweep.searcher": "grid"}).validate()
    with pytest.raises(ConfigError, match="sweep.objective"):
        job(**{"sweep.objective": "train/loss"}).validate()
    with pytest.raises(ConfigError, match="ASHA can never stop a trial early"):
        job(**{"train.epochs": 1, "sweep.grace_period": 1}).validate()
    job(**{"train.epochs": 1, "sweep.scheduler": "fifo"}).validate()  # no ASHA, no constraint


@pytest.mark.parametrize("cpus", [0.0, -1.0, 0.00001])
def test_a_trial_driver_without_cpu_is_refused_up_front_naming_the_value(cpus):
    with pytest.raises(ConfigError, match=rf"sweep.driver_cpus={cpus!r} is not allowed: a number >= 0.0001: "):
        job(**{"sweep.driver_cpus": cpus}).validate()


def test_tune_refuses_a_trial_driver_of_0_cpu_and_takes_the_smallest_fraction():
    """Why 0 is refused up front: Tune fails on it only once the sweep starts (a Ray upgrade
    that takes it would fail this test; sweep.driver_cpus 0 could then be allowed)."""
    from ray import tune

    with pytest.raises(ValueError, match="empty head and zero worker bundles"):
        tune.with_resources(lambda config: None, {"cpu": 0.0})
    tune.with_resources(lambda config: None, {"cpu": 0.0001})
    job(**{"sweep.driver_cpus": 0.0001}).validate()


def test_domains_follow_the_searcher():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = job(**{"sweep.space": {"model.mask_ratio": "grid [0.5, 0.75]", "train.warmup_epochs": "choice [0, 1]",
                                 "train.blr": "loguniform [1e-4, 1e-3]", "train.log_every_steps": "randint [1, 3]"}})
    dims = parse_space(cfg)
    random = param_space(dims, "random")
    assert random["model.mask_ratio"] == {"grid_search": [0.5, 0.75]}  # enumerated
    assert isinstance(random["train.warmup_epochs"], Categorical)  # sampled
    assert isinstance(random["train.blr"], Float)
    assert isinstance(random["train.log_every_steps"], Integer)
    assert random["train.log_every_steps"].upper == 4  # inclusive bound -> Tune's exclusive one
    tpe = param_space(dims, "tpe")  # TPE cannot take grid_search
    assert isinstance(tpe["model.mask_ratio"], Categorical)
    grid_only = param_space(dims[:2], "grid")  # every categorical dimension is enumerated
    assert grid_only["train.warmup_epochs"] == {"grid_search": [0, 1]}


def test_objective_defaults_to_knn_on_labeled_data_else_reconstruction():
    cfg = TuneJobConfig()
    assert resolve_objective(cfg, val_has_labels=True) == ("val/knn_top1", "max")
    assert resolve_objective(cfg, val_has_labels=False) == ("val/recon_loss", "min")
    assert resolve_objective(job(**{"train.knn_k": 0}), val_has_labels=True) == ("val/recon_loss", "min")
    assert resolve_objective(job(**{"sweep.objective": "val/recon_loss"}), True) == ("val/recon_loss", "min")
    with pytest.raises(ConfigError, match="needs a labeled validation split"):
        resolve_objective(job(**{"sweep.objective": "val/knn_top1"}), val_has_labels=False)


def test_trial_resources_add_up_to_what_the_cluster_fits():
    cfg = job(**{"dist.num_workers": 2, "dist.cpus_per_worker": 1.0, "dist.gpus_per_worker": 1.0}).pretrain()
    cpu = trial_resources(cfg, use_gpu=False, driver_cpus=0.25)
    assert cpu == {"CPU": 2.25}
    assert concurrent_trials(0, cpu, {"CPU": 4.0}) == 1  # two trials would need 4.5 CPUs
    assert concurrent_trials(0, cpu, {"CPU": 4.5}) == 2
    assert concurrent_trials(3, cpu, {"CPU": 4.0}) == 3  # an explicit limit wins
    gpu = trial_resources(cfg, use_gpu=True, driver_cpus=0.25)
    assert gpu == {"CPU": 2.25, "GPU": 2.0}
    assert concurrent_trials(0, gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs are the limit
    assert concurrent_trials(0, gpu, {"CPU": 1.0}) == 1  # none fits now: one, for the autoscaler


def test_summary_table_marks_the_best_trial():
    trials = [
        TrialSummary("a_00000", {"train.blr": 1e-3}, "completed", 2, 0.5, 0.6, "/x"),
        TrialSummary("a_00001", {"train.blr": 1e-8}, "stopped early", 1, 0.9, 1.1, "/y"),
    ]
    table = format_table(trials, "val/recon_loss", trials[0]).splitlines()
    assert table[0].split() == ["trial", "train.blr", "status", "epochs", "val/recon_loss", "train/loss"]
    assert table[2].startswith("a_00000 *") and "completed" in table[2]
    assert "stopped early" in table[3] and "*" not in table[3]


def test_tpe_searcher_is_optuna_tpe_over_the_space_and_asha_runs_on_epochs():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from service.tune.asha import TIME_ATTR
    from service.tune.sweep import scheduler_for, searcher_for

    cfg = job(**{"sweep.searcher": "tpe", "sweep.seed": 7, "train.epochs": 8, "sweep.grace_period": 2}).validate()
    searcher = searcher_for(cfg)
    assert isinstance(searcher, OptunaSearch)
    assert isinstance(searcher._sampler, optuna.samplers.TPESampler)
    assert searcher_for(job(**{"sweep.searcher": "random"}), 3).max_concurrent == 3  # Tune's variant generator
    scheduler = scheduler_for(cfg, "/tmp/unused/asha_state.json")
    assert scheduler._time_attr == TIME_ATTR and scheduler._max_t == 8
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [8, 4, 2]  # grace 2, factor 2, up to 8
    assert scheduler_for(job(**{"sweep.scheduler": "fifo"}), "/unused") is None


def test_grid_values_the_model_size_cannot_take_fail_up_front():
    with pytest.raises(ConfigError, match=r"sweep.space.model.mask_ratio: value 0.9 .*at most 0.75"):
        job(**{"model.img_size": 32, "sweep.space": {"model.mask_ratio": "grid [0.6, 0.9]"}}).validate()  # 4 patches
    job(**{"model.img_size": 64, "sweep.space": {"model.mask_ratio": "grid [0.6, 0.9]"}}).validate()


def drawn_params(cfg: TuneJobConfig) -> list[dict]:
    """The trial configs the sweep's search algorithm draws, without running any trial."""
    from ray.tune.experiment import Experiment

    from service.tune.sweep import searcher_for

    search = searcher_for(cfg, max_concurrent=1)
    search.add_configurations([Experiment("draws", lambda config: None, num_samples=cfg.sweep.num_samples,
                                          config=param_space(parse_space(cfg), cfg.sweep.searcher))])
    drawn = []
    while (trial := search.next_trial()) is not None:
        drawn.append(trial.config)
        search.on_trial_complete(trial.trial_id)  # frees the one concurrent slot
    return drawn


def test_sweep_seed_makes_random_and_grid_sweeps_draw_the_same_trials():
    space = {"model.mask_ratio": "grid [0.6, 0.75]", "train.blr": "loguniform [1e-4, 1e-3]"}
    random = job(**{"sweep.searcher": "random", "sweep.num_samples": 3, "sweep.seed": 5, "sweep.space": space})
    first = drawn_params(random)
    assert len(first) == 6 and len({d["train.blr"] for d in first}) == 6
    assert drawn_params(random) == first  # the same sweep again: the same learning rates
    assert drawn_params(with_overrides(random, {"sweep.seed": 6})) != first

    grid = job(**{"sweep.searcher": "grid", "sweep.num_samples": 2, "sweep.seed": 5,
                  "sweep.space": {"model.mask_ratio": "grid [0.6, 0.75]", "train.blr": "choice [1e-4, 1e-3]"}})
    assert drawn_params(grid) == drawn_params(grid)
    assert len(drawn_params(grid)) == 8  # 2 x 2 values, num_samples times
