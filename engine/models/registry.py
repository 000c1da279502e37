"""Which architectures we implement, and building one from a checkpoint's config."""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from kernels import Ops

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


# A config made in memory (AutoModelForCausalLM.from_config) names no architectures, only its type.
BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


class UnsupportedModelError(ValueError):
    pass


def model_class(hf_config: Any) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in BY_MODEL_TYPE:
        archs = [BY_MODEL_TYPE[hf_config.model_type]]
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise UnsupportedModelError(
        f"unsupported architecture {archs or [getattr(hf_config, 'model_type', '?')]}; "
        f"supported: {', '.join(MODELS)}"
    )


def build_model(hf_config: Any, ops: Ops) -> nn.Module:
    return model_class(hf_config)(hf_config, ops)


def max_model_len(hf_config: Any) -> int:
    """Longest sequence the model supports: its positions, capped by a sliding window we do not implement."""
    n = getattr(hf_config, "max_position_embeddings", None) or hf_config.n_positions
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)
    if window and uses_window and window < n:
        # Attention over at most `window` tokens equals full attention while the context fits in it.
        n = window
    return int(n)
