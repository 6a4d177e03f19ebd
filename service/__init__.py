"""The ConvMAE training service: config, data pipeline, DeepSpeed on Ray Train, MLflow, Tune."""
