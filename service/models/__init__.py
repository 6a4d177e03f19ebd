"""Where a downstream job's model comes from (``source``): one ``--model`` string, one model."""
