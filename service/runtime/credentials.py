"""Credentials for the processes a driver starts (training workers, Tune trials), never in
logged form.

Ray writes runtime envs, ``env_vars`` included, in plain text to its session logs
(``runtime_env_agent.log``) and shows them in the dashboard and job API, so no credential goes
there (``service.runtime.cluster.forwarded_env`` leaves them out). A worker finds them in two
places:

1. its own environment. On a local cluster every Ray process inherits the environment of the
   driver that started it; on a real cluster, the node's (a Kubernetes Secret as env, or no
   variables at all and an instance or pod role found by botocore's chain).
2. the driver's credentials, shared through Ray's object store: ``share_credentials`` puts them
   there once, the driver hands the reference to its workers inside their config, and each
   worker ``adopt_credentials`` at start. Ray logs object references, never object contents.
   This covers a driver holding credentials the nodes lack (a laptop driving a remote cluster).

The driver's set wins, as the workers' runtime env did before: a job runs with the
credentials of whoever started it.

Ray Tune is the one part of Ray that puts credentials into a runtime env by itself: it copies the
driver's ``AWS_*`` variables into every trial actor's (``ray.tune.execution.class_cache``).
``keep_credentials_out_of_tune`` stops that before a sweep starts; trials adopt the shared set
like training workers do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Each group travels whole: a worker given the driver's key and secret must not keep a session
# token of its own, which belongs to other credentials.
CREDENTIAL_GROUPS: dict[str, tuple[str, ...]] = {
    "aws": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"),
    "mlflow": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"),
}
# Names of variables that hold a secret whatever their prefix (AWS_CONTAINER_AUTHORIZATION_TOKEN...).
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL", "AUTH")


def is_secret_env(name: str) -> bool:
    """Whether environment variable ``name`` holds (or may hold) a credential."""
    upper = name.upper()
    return any(upper in group for group in CREDENTIAL_GROUPS.values()) or any(w in upper for w in _SECRET_WORDS)


def driver_credentials() -> dict[str, str]:
    """The credential variables set in this process."""
    return {name: os.environ[name] for group in CREDENTIAL_GROUPS.values() for name in group if os.environ.get(name)}


def share_credentials() -> Any | None:
    """An object reference to this process's credentials (None when it has none), for the
    workers it starts to ``adopt_credentials``. Needs a connected Ray."""
    credentials = driver_credentials()
    if not credentials:
        return None
    import ray

    return ray.put(credentials)


def adopt_credentials(ref: Any | None) -> None:
    """Sets the credentials shared by the driver into this process's environment, before any
    client reads them; groups the driver did not share keep this process's own values.

    ``ref`` is what ``share_credentials`` returned, or its value where Ray already resolved it
    (a reference passed as a task's own argument arrives as the value)."""
    if ref is None:
        return
    if isinstance(ref, Mapping):
        shared = dict(ref)
    else:
        import ray

        shared = ray.get(ref)
    for group in CREDENTIAL_GROUPS.values():
        if not any(name in shared for name in group):
            continue
        for name in group:
            if name in shared:
                os.environ[name] = shared[name]
            else:
                os.environ.pop(name, None)


def keep_credentials_out_of_tune() -> None:
    """Stops Ray Tune from copying this process's credential variables into its trials' runtime
    envs, which Ray writes to ``runtime_env_agent.log`` in plain text.

    Tune reads its list of variables to propagate from a module constant each time it creates a
    trial actor; Ray offers no setting for it. A Ray without that constant has nothing to strip,
    and the planted-secret sweep test guards against Tune propagating credentials some other way.
    """
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = type(propagated)(n for n in propagated if not is_secret_env(n))
