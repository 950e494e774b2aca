"""Dataclass configs for DalleBart, VQGAN and CLIP, read from a checkpoint's ``config.json``.

Sizes always come from the checkpoint: nothing in the engine is hard-coded to one model size. The named
presets reproduce the published shapes (DALL·E mini / Mega, ``vqgan_imagenet_f16_16384``, OpenAI CLIP
ViT-B/32 and ViT-L/14) so that ``python -m engine inspect mini`` can count parameters without any file.

Reading rules: unknown keys are ignored (published files carry many training-only keys); a missing
required key is a :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="_FromDict")


class ConfigError(ValueError):
    """A config file is missing a required key, has a bad value, or asks for an unsupported variant."""


class _FromDict:
    """Shared ``from_dict`` / ``to_dict`` / ``from_json`` for the config dataclasses."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()
    ALIASES: ClassVar[dict[str, str]] = {}
    RUNTIME: ClassVar[tuple[str, ...]] = ()  # how this process lays the model out: never read from or written to JSON

    @classmethod
    def from_dict(cls: type[T], raw: dict[str, Any], *, source: str = "config") -> T:
        data = dict(raw)
        for alias, name in cls.ALIASES.items():
            if alias in data and name not in data:
                data[name] = data[alias]
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r} for {cls.__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {}
        for key, value in data.items():
            if key not in names or key in cls.RUNTIME:
                continue
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            obj = cls(**kwargs)  # type: ignore[call-arg]
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {exc}") from exc
        obj.validate(source)  # type: ignore[attr-defined]
        return obj

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such config file") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k not in self.RUNTIME}

    def validate(self, source: str = "config") -> None:
        """Raise :class:`ConfigError` for values the engine cannot run."""


# ----------------------------------------------------------------------------------------------
# DalleBart
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DalleBartConfig(_FromDict):
    """Text→image-token encoder–decoder (DALL·E mini's BART variant).

    ``image_vocab_size`` counts the VQGAN codes the model may emit *and* any padding rows of the
    published checkpoints (mega: 16415); the decoder embedding and ``lm_head`` have ``image_vocab_size + 1``
    rows, the extra row being the start token. Only ids ``< valid_image_codes`` are ever sampled.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "encoder_vocab_size",
        "image_vocab_size",
    )
    RUNTIME: ClassVar[tuple[str, ...]] = ("transposed_kernels",)

    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 2730
    decoder_ffn_dim: int = 2730
    encoder_vocab_size: int = 50264
    image_vocab_size: int = 16384
    max_text_length: int = 64
    image_length: int = 256
    decoder_start_token_id: int = 16384
    bos_token_id: int = 16385
    eos_token_id: int = 16385
    pad_token_id: int = 16385
    # number of VQGAN codes (ids the sampler may emit); defaults to min(image_vocab_size, 16384)
    valid_image_codes: int | None = None
    ln_type: str = "layernorm"
    ln_positions: str = "normformer"
    use_glu: bool = True
    use_bias: bool = False
    force_ln_scale: bool = False
    activation_function: str = "gelu"
    init_std: float = 0.02
    use_scan: bool = True
    gradient_checkpointing: bool = False
    # dense kernels stored (out, in) instead of the published (in, out): the sampler's decode layout (see
    # engine.models.layout.to_decode_layout); a runtime choice, never in config.json
    transposed_kernels: bool = False
    normalize_text: bool = True
    tie_word_embeddings: bool = False
    # variant switches of the reference code; only the published setting is implemented
    use_head_scale: bool = False
    use_cosine_attention: bool = False
    use_swin_position_embeddings: bool = False
    sinkhorn_iters: int = 1
    use_deepnet_scaling: bool = False
    use_subln_init: bool = False
    use_alibi: bool = False
    scale_embedding: bool = False
    use_absolute_position_embeddings: bool = True
    use_final_ln_encoder: bool = True
    use_final_ln_decoder: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0

    @property
    def num_image_codes(self) -> int:
        """Ids the sampler may emit (the VQGAN codebook size)."""
        if self.valid_image_codes is not None:
            return int(self.valid_image_codes)
        return min(self.image_vocab_size, 16384)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    def validate(self, source: str = "config") -> None:
        unsupported = {
            "ln_type": (self.ln_type, "layernorm"),
            "ln_positions": (self.ln_positions, "normformer"),
            "use_glu": (self.use_glu, True),
            "use_bias": (self.use_bias, False),
            "use_head_scale": (self.use_head_scale, False),
            "use_cosine_attention": (self.use_cosine_attention, False),
            "use_swin_position_embeddings": (self.use_swin_position_embeddings, False),
            "sinkhorn_iters": (self.sinkhorn_iters, 1),
            "use_deepnet_scaling": (self.use_deepnet_scaling, False),
            "use_subln_init": (self.use_subln_init, False),
            "use_alibi": (self.use_alibi, False),
            "scale_embedding": (self.scale_embedding, False),
            "use_absolute_position_embeddings": (self.use_absolute_position_embeddings, True),
            "use_final_ln_encoder": (self.use_final_ln_encoder, True),
            "use_final_ln_decoder": (self.use_final_ln_decoder, True),
            "tie_word_embeddings": (self.tie_word_embeddings, False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(
                    f"{source}: {key}={value!r} is not implemented (only the published setting "
                    f"{key}={supported!r} is)"
                )
        if self.activation_function not in ("gelu", "gelu_new", "relu", "swish", "silu"):
            raise ConfigError(f"{source}: activation_function={self.activation_function!r} is not supported")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ConfigError(f"{source}: d_model={self.d_model} is not divisible by {name}")
        if self.num_image_codes > self.image_vocab_size:
            raise ConfigError(f"{source}: valid_image_codes exceeds image_vocab_size")


# ----------------------------------------------------------------------------------------------
# VQGAN
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQGANConfig(_FromDict):
    """Taming-transformers VQGAN (``vqgan_imagenet_f16_16384`` layout); images in [0, 1], NHWC."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("ch", "ch_mult", "n_embed", "embed_dim")

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    double_z: bool = False
    dropout: float = 0.0
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    # GroupNorm groups (min(norm_groups, channels) per layer); 32 in the published model, fewer for tiny ones
    norm_groups: int = 32
    # the decoder's own channel multipliers (None: ch_mult, as published); a wider decoder draws sharper
    # outlines from the same tokens, so it can be trained after the encoder and codebook are fixed. Each entry
    # beyond len(ch_mult) is one more upsampling level: the decoder then draws images larger than it encodes
    # (output_resolution), so a short token grid still gives full-sized pictures
    decoder_ch_mult: tuple[int, ...] | None = None

    @property
    def decoder_mult(self) -> tuple[int, ...]:
        return self.decoder_ch_mult if self.decoder_ch_mult is not None else self.ch_mult

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["decoder_ch_mult"] is None:  # the published layout has no such key
            del out["decoder_ch_mult"]
        return out

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the image grid (16 for the published f16 model at 256 px)."""
        return self.resolution // self.downsample_factor

    @property
    def output_resolution(self) -> int:
        """Side of the decoded images: ``resolution``, doubled for each decoder level beyond the encoder's."""
        return self.grid_size * 2 ** (len(self.decoder_mult) - 1)

    @property
    def upsample_factor(self) -> int:
        """``output_resolution / resolution``: 1 unless the decoder has extra upsampling levels."""
        return 2 ** (len(self.decoder_mult) - len(self.ch_mult))

    def validate(self, source: str = "config") -> None:
        if self.resolution % self.downsample_factor:
            raise ConfigError(f"{source}: resolution {self.resolution} not divisible by the VQGAN factor")
        if self.double_z:
            raise ConfigError(f"{source}: double_z=True is not implemented")
        if self.decoder_ch_mult is not None and (len(self.decoder_ch_mult) < len(self.ch_mult)
                                                 or min(self.decoder_ch_mult) < 1):
            raise ConfigError(f"{source}: decoder_ch_mult {list(self.decoder_ch_mult)} needs at least "
                              f"{len(self.ch_mult)} positive entries, one per level of ch_mult (more: upsampling)")


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig(_FromDict):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class CLIPVisionConfig(_FromDict):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig(_FromDict):
    """OpenAI CLIP (HF ``CLIPConfig`` layout: ``text_config`` and ``vision_config`` sub-dicts)."""

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> CLIPConfig:
        if "text_config" not in raw or "vision_config" not in raw:
            missing = "text_config" if "text_config" not in raw else "vision_config"
            raise ConfigError(f"{source}: missing required key {missing!r} for CLIPConfig")
        text = CLIPTextConfig.from_dict(raw["text_config"] or {}, source=f"{source}:text_config")
        vision = CLIPVisionConfig.from_dict(raw["vision_config"] or {}, source=f"{source}:vision_config")
        return cls(
            text_config=text,
            vision_config=vision,
            projection_dim=int(raw.get("projection_dim", 512)),
            logit_scale_init_value=float(raw.get("logit_scale_init_value", 2.6592)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


# ----------------------------------------------------------------------------------------------
# Presets (published shapes)
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, Any] = {
    "mini": DalleBartConfig(
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=16,
        decoder_attention_heads=16,
        encoder_ffn_dim=2730,
        decoder_ffn_dim=2730,
        encoder_vocab_size=50264,
        image_vocab_size=16384,
        init_std=0.02,
    ),
    "mega": DalleBartConfig(
        d_model=2048,
        encoder_layers=24,
        decoder_layers=24,
        encoder_attention_heads=32,
        decoder_attention_heads=32,
        encoder_ffn_dim=4096,
        decoder_ffn_dim=4096,
        encoder_vocab_size=50272,
        image_vocab_size=16415,
        init_std=0.01,
    ),
    "vqgan-f16": VQGANConfig(),
    "clip-b32": CLIPConfig(),
    "clip-l14": CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
        ),
        projection_dim=768,
    ),
}


def preset(name: str) -> Any:
    """A published config by name (``mini``, ``mega``, ``vqgan-f16``, ``clip-b32``, ``clip-l14``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
