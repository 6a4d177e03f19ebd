"""Ray Tune sweeps: search space to Tune domains (``space``), the resumable ASHA scheduler
(``asha``), and the sweep driver (``sweep``)."""
