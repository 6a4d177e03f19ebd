"""ASHA whose rung records survive a restored sweep.

Tune restores trials and searcher state but not the scheduler's: a restored ASHA would have
forgotten the finished trials' rung results and stop nothing. ``ResumableASHA`` writes its
rungs next to the experiment after every decision and reads them back on its first use.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from service.config import StorageConfig, from_dict

log = logging.getLogger(__name__)

TIME_ATTR = "epochs_completed"  # reported by every epoch-end checkpoint of the training loop


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that keeps its rungs in ``state_url`` (local or object storage)."""

    def __init__(self, state_url: str, storage: dict[str, Any], **asha_kwargs: Any) -> None:
        super().__init__(time_attr=TIME_ATTR, **asha_kwargs)
        # Pickled into the experiment directory by Tune: the storage section holds no credentials.
        self._state_url, self._storage, self._loaded = state_url, storage, False

    def _fs(self):
        import fsspec

        from service.training.launch import persistable_storage_options

        remote = self._state_url.startswith(("s3://", "s3a://"))
        options = persistable_storage_options(from_dict(StorageConfig, self._storage)) if remote else {}
        return fsspec.core.url_to_fs(self._state_url, **options)

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        fs, path = self._fs()
        if not fs.exists(path):
            return
        saved = json.loads(fs.cat_file(path))
        for bracket, rungs in zip(self._brackets, saved["brackets"]):
            for (_, recorded), saved_rung in zip(bracket._rungs, rungs):
                recorded.update(saved_rung)
        log.info("ASHA: restored the rung results of %d trial(s)",
                 len({t for b in saved["brackets"] for r in b for t in r}))

    def _save(self) -> None:
        fs, path = self._fs()
        state = {"brackets": [[dict(recorded) for _, recorded in b._rungs] for b in self._brackets]}
        with fs.open(path, "w") as f:
            json.dump(state, f)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        if TIME_ATTR in result and self._metric in result:
            self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
