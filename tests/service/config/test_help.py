"""``--help`` explains every key of every job, and a mistyped key gets a "did you mean"."""

from __future__ import annotations

import pytest

from service.cli import overrides_help
from service.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    PrepareDataConfig,
    PretrainConfig,
    ReconstructConfig,
    TuneJobConfig,
    flatten,
    key_docs,
    load_config,
)

JOB_CONFIGS = [PretrainConfig, FinetuneConfig, TuneJobConfig, EvaluateConfig, ReconstructConfig, PrepareDataConfig]


@pytest.mark.parametrize("config_cls", JOB_CONFIGS, ids=lambda c: c.__name__)
def test_every_key_of_every_job_is_explained_in_its_help(config_cls):
    docs = key_docs(config_cls)
    lines = overrides_help(config_cls).splitlines()
    for key in flatten(config_cls()):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  --{key} "))
        below = []
        for line in lines[at + 1:]:
            if not line.startswith("      "):
                break
            below.append(line.strip())
        own = docs.get(key) or next(d for k, d in docs.items() if key.startswith(k + "."))  # sweep.space.<key>
        assert " ".join(below) == " ".join(own.split()), f"--{key} is not explained in --help"


def test_a_keys_help_is_its_comment_in_the_source():
    docs = key_docs(PretrainConfig)
    assert docs["train.max_steps"] == "stop early after this many optimizer steps (tests, smoke runs)"
    # A comment above the field, over several lines, is joined.
    assert docs["data.url"].startswith("Any fsspec URL of a prepared shard data set (s3://bucket/prefix,")
    assert docs["data.url"].endswith("generated locally on first use.")
    # A subclass's own comment wins over its base's (TrainConfig.blr over OptimConfig.blr).
    assert docs["train.blr"] == "lr = blr * effective_batch / 256: 1e-3 at the default batch of 32"


@pytest.mark.parametrize(("overrides", "hint"), [
    ({"train.lrr": 1e-3}, "train.lrr: did you mean train.lr?"),
    ({"lr": 1e-3}, "lr: did you mean train.lr?"),  # a key of another section, given at the top
    ({"dist.num_worker": 2}, "dist.num_worker: did you mean dist.num_workers?"),
])
def test_an_unknown_key_gets_the_key_it_probably_meant(overrides, hint):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, overrides)
    assert hint in str(err.value)


def test_an_unknown_key_like_no_known_one_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, {"train.zzzqqq": 1})
    assert "did you mean" not in str(err.value) and "allowed:" in str(err.value)
