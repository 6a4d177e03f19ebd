"""ConvMAE: Masked Convolution Meets Masked Autoencoders (Gao et al., 2022), in PyTorch.

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
    PRESETS,
    ConvMAEConfig,
    convmae_base,
    convmae_huge,
    convmae_large,
    convmae_small,
    convmae_tiny,
    get_config,
)
from .masking import BlockMask, random_block_mask
from .model import ConvMAE, build_model, build_model_from_config
from .patches import patchify, unpatchify
from .pretrained import load_pretrained, save_pretrained
from .reconstruct import reconstruct

__all__ = [
    "PRESETS",
    "BlockMask",
    "CheckpointMismatchError",
    "ConvMAE",
    "ConvMAEBackbone",
    "ConvMAEConfig",
    "PretrainLoadReport",
    "build_model",
    "build_model_from_config",
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
    "official_key_to_ours",
    "our_key_to_official",
    "patchify",
    "random_block_mask",
    "reconstruct",
    "save_pretrained",
    "unpatchify",
]
