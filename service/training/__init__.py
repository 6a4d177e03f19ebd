"""Training on Ray Train workers: the shared worker loop (``loop``), pretraining and fine-tuning
(their workers' steps and their drivers), checkpoints, launching, progress."""
