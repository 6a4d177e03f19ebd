"""Typed configuration of every job: sections, job configs, loading and validation.

- ``schema``: the machinery (YAML + dotted overrides -> frozen dataclasses, flattening).
- ``sections``: the sections configs are made of (``data``, ``storage``, ``train``, ...).
- ``jobs``: the job configs and their validation.
- ``sweep``: the sweep job's config and its search-space grammar.
"""

from service.config.jobs import (
    DEFAULT_MODEL,
    EvaluateConfig,
    FinetuneConfig,
    PrepareDataConfig,
    PretrainConfig,
    ReconstructConfig,
    TrainingJobConfig,
    validate_finetune,
    validate_model_source_keys,
    validate_pretrain,
)
from service.config.schema import (
    ConfigError,
    check,
    dump_yaml,
    flatten,
    from_dict,
    key_docs,
    load_config,
    parse_cli_overrides,
    redact_text,
    redact_url,
    redacted,
    set_dotted,
    to_dict,
    with_overrides,
)
from service.config.sections import (
    DECODE_MODES,
    PRECISIONS,
    ZERO_STAGES,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    FinetuneTrainConfig,
    MLflowConfig,
    ModelConfig,
    OptimConfig,
    StorageConfig,
    TrainConfig,
)
from service.config.sweep import SweepConfig, TuneJobConfig

__all__ = [
    "DECODE_MODES", "DEFAULT_MODEL", "PRECISIONS", "ZERO_STAGES", "CheckpointConfig", "ConfigError", "DataConfig",
    "DistributedConfig", "EvaluateConfig", "FinetuneConfig", "FinetuneTrainConfig", "MLflowConfig",
    "ModelConfig", "OptimConfig", "PrepareDataConfig", "PretrainConfig", "ReconstructConfig", "StorageConfig", "SweepConfig",
    "TrainConfig", "TrainingJobConfig", "TuneJobConfig", "check", "dump_yaml", "flatten", "from_dict", "key_docs",
    "load_config", "parse_cli_overrides", "redact_text", "redact_url", "redacted", "set_dotted", "to_dict", "validate_finetune",
    "validate_model_source_keys", "validate_pretrain", "with_overrides",
]
