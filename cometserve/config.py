"""Runtime configuration. This module is the only reader of environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    """Where derived assets live (the 16-bit copy of the shipped model, extracted text).

    `COMETSERVE_CACHE` overrides; the default follows XDG.
    """
    root = os.environ.get("COMETSERVE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cometserve"


@dataclass(frozen=True)
class LaunchEnv:
    """Where torchrun placed this process: global rank, world size and the GPU index on its host."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> LaunchEnv | None:
    """The torchrun (or torch.distributed.launch) environment of this process, or None outside one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return LaunchEnv(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


@dataclass(frozen=True)
class ModelConfig:
    """The shapes of a LLaMA-family network, read from a Hugging Face config (Llama 2/3, Mistral, Qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    sliding_window: int | None = None  # Mistral v0.1: attention is full up to here, so serving caps the context

    @property
    def max_model_len(self) -> int:
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {self.model_type!r} is not supported; "
                f"cometserve serves {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """`hf`: a transformers PretrainedConfig."""
        model_type = hf.model_type
        heads = hf.num_attention_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_window=getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None,
        )


SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
