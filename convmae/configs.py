"""Model configurations: one frozen dataclass and the named presets.

Provenance of the presets (the official repository, Alpha-VL/ConvMAE, ships code for Base only):

* ``convmae_base``: ``convmae_convvit_base_patch16_dec512d8b`` in the official ``models_convmae.py``
  (also used unchanged by the official fine-tuning, detection and segmentation configs).
* ``convmae_large``: embed dims 384/768/1024, depths 2/2/23, 16 heads, MLP ratios 8/8/4. The
  official README (May 2022) lists ConvMAE-L at 322M parameters; this configuration's encoder has
  321.75M, and it is the Large configuration that later Alpha-VL-derived code (ConvMAE-v2 family)
  carries. Note: some tracking code (MixFormer) builds a different "convmae_large" with depths
  2/2/20 and MLP ratio 4 (272M), which does not match the official 322M figure.
* ``convmae_huge``: embed dims 768/1024/1280, depths 2/2/31, 16 heads, MLP ratios 8/8/4, the Huge
  configuration of the same ConvMAE-v2 family. The official repository releases ConvMAE-v2-Huge
  weights but neither code nor a parameter count for it, so this preset is derived, not verified.
* ``convmae_small``: embed dims 128/256/384, depths 2/2/11, 6 heads, MLP ratio 4, i.e. Base with
  ViT-S widths (384 = 6 heads of 64), as in the Alpha-VL FastConvMAE family. Derived, not verified.
* ``convmae_tiny``: ours, for CPU tests only.
* ``mae_tiny`` / ``mae_small`` / ``mae_base``: the plain-ViT MAE baseline (``MAEConfig``,
  ``vit_mae.py``), each sized to cost the same pretraining FLOPs per image as the ConvMAE preset
  of the same size (counted by ``service/runtime/flops.py``; see ``MAE_FLOP_MATCH``).

All presets use the official MAE-style decoder (512-d, 8 blocks, 16 heads). The official model
builds its decoder blocks with the *first* stage's MLP ratio (``mlp_ratio[0]``), so
``decoder_mlp_ratio`` is 4 for Base and 8 for Large/Huge. ``norm_pix_loss`` is on in the presets
because the official pretraining recipe (PRETRAIN.md) passes ``--norm_pix_loss``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

# Sanity limits on a configuration, checked before any weight is allocated: a config.json from
# elsewhere (a save_pretrained folder, a registry download) could otherwise ask for hundreds of
# GB before anything notices. Each is well above convmae_huge (dims 768/1024/1280, depths
# 2/2/31, 16 heads, 744M parameters with its decoder) and far below absurd.
LIMITS: dict[str, tuple[int, int]] = {
    "img_size": (1, 4096),
    "in_chans": (1, 16),
    "patch_sizes": (1, 32),
    "embed_dims": (1, 4096),
    "depths": (1, 64),
    "num_heads": (1, 128),
    "decoder_embed_dim": (1, 4096),
    "decoder_depth": (1, 64),
    "decoder_num_heads": (1, 128),
    "dw_kernel_size": (1, 31),
}
MAX_MLP_RATIO = 16.0
# About 5x convmae_huge: 16 GB of fp32 weights, before gradients and optimizer state.
MAX_PARAMETERS = 4_000_000_000


class TokenGrid:
    """The token grid of a config with ``img_size`` and ``patch_size`` (both model families)."""

    img_size: int
    patch_size: int

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class ConvMAEConfig(TokenGrid):
    img_size: int = 224
    in_chans: int = 3
    # Strides of the three patch embeddings; their product is the token (and loss) patch size.
    patch_sizes: tuple[int, int, int] = (4, 2, 2)
    embed_dims: tuple[int, int, int] = (256, 384, 768)
    depths: tuple[int, int, int] = (2, 2, 11)
    # Heads of the stage-3 transformer blocks (the conv stages have no attention).
    num_heads: int = 12
    mlp_ratios: tuple[float, float, float] = (4.0, 4.0, 4.0)
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    # Kernel of the depthwise convolution that replaces attention in stages 1-2.
    dw_kernel_size: int = 5
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    # True: stages 1-2 are evaluated only on the cells of visible 16x16 blocks (the depthwise conv
    # still runs on the full grid with masked cells zeroed). Visible-token outputs, loss and
    # gradients equal the dense formulation of the paper; masked cells, whose values never reach
    # a visible token, are simply not computed. False: the paper's dense masked convolution.
    sparse_conv_stages: bool = True

    def __post_init__(self) -> None:
        for name in ("patch_sizes", "embed_dims", "depths", "mlp_ratios"):
            raw = getattr(self, name)
            if not isinstance(raw, (tuple, list)):
                raise ValueError(f"{name}={raw!r} is not allowed: one entry per stage (3)")
            value = tuple(raw)
            if len(value) != 3:
                raise ValueError(f"{name} must have one entry per stage (3), got {value!r}")
            object.__setattr__(self, name, value)
        self._check_limits()
        object.__setattr__(self, "mlp_ratios", tuple(float(r) for r in self.mlp_ratios))
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of the token patch size "
                f"{self.patch_size} (= product of patch_sizes {self.patch_sizes})"
            )
        if self.embed_dims[2] % self.num_heads:
            raise ValueError(f"embed_dims[2]={self.embed_dims[2]} not divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={self.decoder_embed_dim} not divisible by "
                f"decoder_num_heads={self.decoder_num_heads}"
            )
        if self.dw_kernel_size % 2 != 1:
            raise ValueError(f"dw_kernel_size must be odd, got {self.dw_kernel_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def _check_limits(self) -> None:
        """Types and ``LIMITS``, then the parameter count: each error names the field."""
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            for key, item in _items(name, value):
                if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                    raise ValueError(f"{key}={item!r} is not allowed: a whole number in {low}..{high}")
        for key, item in (*_items("mlp_ratios", self.mlp_ratios), ("decoder_mlp_ratio", self.decoder_mlp_ratio)):
            if (isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item)
                    or not 0 < item <= MAX_MLP_RATIO):
                raise ValueError(f"{key}={item!r} is not allowed: a number in (0, {MAX_MLP_RATIO:g}]")
        if not isinstance(self.drop_path_rate, (int, float)) or isinstance(self.drop_path_rate, bool):
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} is not allowed: a number in [0, 1)")
        count = self.estimated_parameters()
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"a model of about {count / 1e9:.1f}B parameters is not allowed: at most {MAX_PARAMETERS / 1e9:g}B "
                f"(embed_dims={list(self.embed_dims)}, depths={list(self.depths)}, img_size={self.img_size}, "
                f"decoder_embed_dim={self.decoder_embed_dim}, decoder_depth={self.decoder_depth})"
            )

    def estimated_parameters(self) -> int:
        """Weights of the pretraining model (encoder + decoder, position embeddings included),
        from the config alone; within a few percent of the built model's count."""
        c = self.in_chans
        (c1, c2, c3), (p1, p2, p3), (d1, d2, d3) = self.embed_dims, self.patch_sizes, self.depths
        r1, r2, r3 = self.mlp_ratios
        k, dec = self.dw_kernel_size, self.decoder_embed_dim
        tokens = (self.img_size // max(1, p1 * p2 * p3)) ** 2

        def conv_block(d: int, r: float) -> float:
            return 2 * d * d + d * k * k + 2 * d * d * r  # pw_in, pw_out, depthwise, MLP

        def transformer_block(d: int, r: float) -> float:
            return 4 * d * d + 2 * d * d * r  # qkv + proj, MLP

        encoder = (p1 * p1 * c * c1 + p2 * p2 * c1 * c2 + p3 * p3 * c2 * c3 + c3 * c3
                   + d1 * conv_block(c1, r1) + d2 * conv_block(c2, r2) + d3 * transformer_block(c3, r3)
                   + tokens * c3)
        fuse = c1 * c3 * (p2 * p3) ** 2 + c2 * c3 * p3 * p3
        decoder = (c3 * dec + tokens * dec + self.decoder_depth * transformer_block(dec, self.decoder_mlp_ratio)
                   + dec * (p1 * p2 * p3) ** 2 * c)
        return int(encoder + fuse + decoder)

    @property
    def patch_size(self) -> int:
        """Side of the 16x16 token patch: what masking, patchify and the loss work on."""
        return math.prod(self.patch_sizes)

    @property
    def encoder_dim(self) -> int:
        """Width of the tokens the encoder hands to the decoder (stage 3)."""
        return self.embed_dims[2]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvMAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ConvMAEConfig fields: {unknown}")
        return cls(**dict(d))

    def replace(self, **overrides: Any) -> ConvMAEConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ConvMAEConfig fields: {unknown}")
        return dataclasses.replace(self, **overrides)


def _items(name: str, value: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs to check: ``embed_dims[2]`` for the entries of a per-stage tuple."""
    if isinstance(value, tuple):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class MAEConfig(TokenGrid):
    """The plain-ViT MAE baseline (He et al., 2022): one patch embedding straight to a ViT.

    Same token grid, masking, decoder and loss as ``ConvMAEConfig``; what it lacks are the two
    convolution stages and the multi-scale fusion. ``to_dict`` records ``family: mae`` so that
    a ``config.json`` says which model it builds (``config_from_dict``).
    """

    img_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        limits = {"img_size": LIMITS["img_size"], "in_chans": LIMITS["in_chans"], "patch_size": (1, 64),
                  "embed_dim": LIMITS["embed_dims"], "depth": LIMITS["depths"], "num_heads": LIMITS["num_heads"],
                  **{k: LIMITS[k] for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}}
        for key, (low, high) in limits.items():
            item = getattr(self, key)
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                raise ValueError(f"{key}={item!r} is not allowed: a whole number in {low}..{high}")
        for key in ("mlp_ratio", "decoder_mlp_ratio"):
            item = getattr(self, key)
            if (isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item)
                    or not 0 < item <= MAX_MLP_RATIO):
                raise ValueError(f"{key}={item!r} is not allowed: a number in (0, {MAX_MLP_RATIO:g}]")
            object.__setattr__(self, key, float(item))
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} not divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim={self.decoder_embed_dim} not divisible by "
                             f"decoder_num_heads={self.decoder_num_heads}")
        if isinstance(self.drop_path_rate, bool) or not isinstance(self.drop_path_rate, (int, float)) \
                or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} is not allowed: a number in [0, 1)")
        count = self.estimated_parameters()
        if count > MAX_PARAMETERS:
            raise ValueError(f"a model of about {count / 1e9:.1f}B parameters is not allowed: at most "
                             f"{MAX_PARAMETERS / 1e9:g}B (embed_dim={self.embed_dim}, depth={self.depth})")

    def estimated_parameters(self) -> int:
        """Weights of the pretraining model (encoder + decoder, position embeddings included)."""
        d, dec, tokens = self.embed_dim, self.decoder_embed_dim, self.num_patches
        pixels = self.patch_size**2 * self.in_chans
        encoder = pixels * d + tokens * d + self.depth * (4 * d * d + 2 * d * d * self.mlp_ratio)
        decoder = (d * dec + tokens * dec + dec * pixels
                   + self.decoder_depth * (4 * dec * dec + 2 * dec * dec * self.decoder_mlp_ratio))
        return int(encoder + decoder)

    @property
    def encoder_dim(self) -> int:
        return self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return {"family": MAE_FAMILY, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MAEConfig:
        fields = {k: v for k, v in d.items() if k != "family"}
        if d.get("family", MAE_FAMILY) != MAE_FAMILY:
            raise ValueError(f"family={d.get('family')!r} is not an MAEConfig (family {MAE_FAMILY!r})")
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MAEConfig fields: {unknown}")
        return cls(**fields)

    def replace(self, **overrides: Any) -> MAEConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown MAEConfig fields: {unknown}")
        return dataclasses.replace(self, **overrides)


MAE_FAMILY = "mae"
# Either model's configuration; both have img_size, patch_size, grid_size, num_patches,
# encoder_dim, norm_pix_loss, to_dict and replace.
ModelConfig = Union[ConvMAEConfig, MAEConfig]


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """The config a ``to_dict`` wrote: an ``MAEConfig`` for ``family: mae``, else (no family
    key, as every ConvMAE config.json) a ``ConvMAEConfig``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a model config must be a mapping of fields, got {type(d).__name__}")
    family = d.get("family")
    if family == MAE_FAMILY:
        return MAEConfig.from_dict(d)
    if family is not None:
        raise ValueError(f"family={family!r} is not allowed: {MAE_FAMILY!r} or absent (ConvMAE)")
    return ConvMAEConfig.from_dict(d)


def convmae_tiny() -> ConvMAEConfig:
    """A few-hundred-thousand-parameter model for CPU tests (not an official size)."""
    return ConvMAEConfig(
        img_size=64,
        embed_dims=(32, 48, 64),
        depths=(1, 1, 2),
        num_heads=4,
        mlp_ratios=(4.0, 4.0, 4.0),
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        decoder_mlp_ratio=4.0,
    )


def convmae_small() -> ConvMAEConfig:
    """Derived (see module docstring): Base layout with ViT-S widths."""
    return ConvMAEConfig(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6, mlp_ratios=(4.0, 4.0, 4.0))


def convmae_base() -> ConvMAEConfig:
    """Official ``convmae_convvit_base_patch16_dec512d8b``."""
    return ConvMAEConfig(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, mlp_ratios=(4.0, 4.0, 4.0))


def convmae_large() -> ConvMAEConfig:
    """ConvMAE-L, 322M encoder parameters per the official README (see module docstring)."""
    return ConvMAEConfig(
        embed_dims=(384, 768, 1024),
        depths=(2, 2, 23),
        num_heads=16,
        mlp_ratios=(8.0, 8.0, 4.0),
        decoder_mlp_ratio=8.0,
    )


def convmae_huge() -> ConvMAEConfig:
    """Derived from the ConvMAE-v2 family (see module docstring); no official count to check."""
    return ConvMAEConfig(
        embed_dims=(768, 1024, 1280),
        depths=(2, 2, 31),
        num_heads=16,
        mlp_ratios=(8.0, 8.0, 4.0),
        decoder_mlp_ratio=8.0,
    )


def mae_tiny() -> MAEConfig:
    """Plain-ViT MAE at the pretraining FLOPs per image of ``convmae_tiny`` (same width, token
    grid and decoder; the conv stages' FLOPs bought back as transformer blocks: 8 of them, against
    convmae_tiny's 2 conv + 2 conv + 2 transformer blocks). Pretraining FLOPs/image 0.997x."""
    return MAEConfig(img_size=64, embed_dim=64, depth=8, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                     decoder_num_heads=4)


def mae_small() -> MAEConfig:
    """Plain-ViT MAE (ViT-S width) at the pretraining FLOPs per image of ``convmae_small`` (0.998x)."""
    return MAEConfig(embed_dim=384, depth=18, num_heads=6)


def mae_base() -> MAEConfig:
    """Plain-ViT MAE (ViT-B width) at the pretraining FLOPs per image of ``convmae_base`` (1.011x).

    The paper's MAE-B is ViT-B/16 with 12 blocks and costs 0.85x ConvMAE-B's pretraining FLOPs
    (the conv stages at stride 4 and 8 are not cheap); matching FLOPs rather than parameters
    takes 17 blocks. ``get_config("mae_base", depth=12)`` is the paper's MAE-B."""
    return MAEConfig(embed_dim=768, depth=17, num_heads=12)


# Each MAE preset and the ConvMAE preset whose pretraining FLOPs per image (forward + backward,
# mask ratio 0.75, the preset's img_size, service/runtime/flops.py) it matches within 2%.
MAE_FLOP_MATCH: dict[str, str] = {"mae_tiny": "convmae_tiny", "mae_small": "convmae_small", "mae_base": "convmae_base"}

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "convmae_tiny": convmae_tiny,
    "convmae_small": convmae_small,
    "convmae_base": convmae_base,
    "convmae_large": convmae_large,
    "convmae_huge": convmae_huge,
    "mae_tiny": mae_tiny,
    "mae_small": mae_small,
    "mae_base": mae_base,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None
    return preset().replace(**overrides) if overrides else preset()
