"""Distributed runtime: the Ray cluster (``cluster``), a worker's place in it (``worker``), the
DeepSpeed engine boundary (``engine``), optimizer groups and lr schedule (``optim``), redaction of every
logged message (``logs``)."""
