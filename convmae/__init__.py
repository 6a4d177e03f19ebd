"""ConvMAE: Masked Convolution Meets Masked Autoencoders (Gao et al., 2022), in PyTorch.

Also the plain-ViT MAE baseline it is compared with (``vit_mae.py``, presets ``mae_*``).

Pretraining model, presets, downstream backbone and checkpoint import/export.
"""

from .backbone import ConvMAEBackbone, PretrainLoadReport, encoder_embedding, layer_id_for
from .checkpoint import (
    CheckpointMismatchError,
    convert_official_state_dict,
    export_official_state_dict,
    load_official_checkpoint,
    official_key_to_ours,
    our_key_to_official,
)
from .configs import (
    MAE_FLOP_MATCH,
    PRESETS,
    ConvMAEConfig,
    MAEConfig,
    ModelConfig,
    config_from_dict,
    convmae_base,
    convmae_huge,
    convmae_large,
    convmae_small,
    convmae_tiny,
    get_config,
    mae_base,
    mae_small,
    mae_tiny,
)
from .masking import BlockMask, random_block_mask
from .model import PRETRAINING_MODELS, ConvMAE, build_model, build_model_from_config
from .patches import patchify, unpatchify
from .pretrained import load_pretrained, save_pretrained
from .reconstruct import reconstruct
from .vit_mae import MAE, ViTEncoder

__all__ = [
    "MAE",
    "MAE_FLOP_MATCH",
    "PRESETS",
    "PRETRAINING_MODELS",
    "BlockMask",
    "CheckpointMismatchError",
    "ConvMAE",
    "ConvMAEBackbone",
    "ConvMAEConfig",
    "MAEConfig",
    "ModelConfig",
    "ViTEncoder",
    "PretrainLoadReport",
    "build_model",
    "build_model_from_config",
    "config_from_dict",
    "convert_official_state_dict",
    "convmae_base",
    "convmae_huge",
    "convmae_large",
    "convmae_small",
    "convmae_tiny",
    "encoder_embedding",
    "export_official_state_dict",
    "get_config",
    "layer_id_for",
    "load_official_checkpoint",
    "load_pretrained",
    "mae_base",
    "mae_small",
    "mae_tiny",
    "official_key_to_ours",
    "our_key_to_official",
    "patchify",
    "random_block_mask",
    "reconstruct",
    "save_pretrained",
    "unpatchify",
]
