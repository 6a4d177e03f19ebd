"""ASHA whose rung records outlive the scheduler: a restored sweep's new scheduler still stops
a trial that the finished trials' results say is worse."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from service.tune.asha import TIME_ATTR, ResumableASHA

METRIC = "val/recon_loss"
SETTINGS = {"max_t": 4, "grace_period": 1, "reduction_factor": 2, "metric": METRIC, "mode": "min"}  # rungs 1, 2


@pytest.fixture(params=["local", "s3"])
def state_url(request, tmp_path) -> str:
    if request.param == "local":
        (tmp_path / "sweep").mkdir()  # the sweep's folder, which its lease made
        return str(tmp_path / "sweep" / "asha_state.json")
    return request.getfixturevalue("s3_bucket") + "/sweep/asha_state.json"


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)  # all the scheduler reads of a trial


def epoch_result(epoch: int, loss: float) -> dict:
    return {TIME_ATTR: epoch, METRIC: loss}


def read_state(url: str) -> dict:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(path))


def test_a_new_scheduler_over_the_same_state_remembers_the_rungs(state_url):
    first = ResumableASHA(state_url, {}, **SETTINGS)
    good = trial("good")
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, epoch_result(1, 0.5)) == TrialScheduler.CONTINUE
    first.on_trial_complete(None, good, epoch_result(2, 0.4))
    # Written after each decision: the rungs by milestone, highest first (4 is max_t: unused).
    assert read_state(state_url) == {"brackets": [[{}, {"good": -0.4}, {"good": -0.5}]]}

    # The sweep is restored: Tune builds a new scheduler. A worse trial at epoch 1 is stopped,
    # because the restored rung holds the good trial's result...
    restored = ResumableASHA(state_url, {}, **SETTINGS)
    worse = trial("worse")
    restored.on_trial_add(None, worse)
    assert restored.on_trial_result(None, worse, epoch_result(1, 0.9)) == TrialScheduler.STOP
    assert read_state(state_url)["brackets"][0][2] == {"good": -0.5, "worse": -0.9}
    # ... where Tune's own scheduler, which restores no rungs, would let it go on.
    forgetful = ASHAScheduler(time_attr=TIME_ATTR, **SETTINGS)
    forgetful.on_trial_add(None, worse)
    assert forgetful.on_trial_result(None, worse, epoch_result(1, 0.9)) == TrialScheduler.CONTINUE


def test_a_result_without_the_epoch_count_or_metric_changes_nothing(state_url):
    scheduler = ResumableASHA(state_url, {}, **SETTINGS)
    scheduler.on_trial_add(None, trial("t"))
    assert scheduler.on_trial_result(None, trial("t"), {METRIC: 0.5}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial("t"), {TIME_ATTR: 1}) == TrialScheduler.CONTINUE
    import fsspec

    fs, path = fsspec.core.url_to_fs(state_url)
    assert not fs.exists(path)  # nothing decided, nothing written
