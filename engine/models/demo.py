"""Small random checkpoints written with transformers: the demo model, and the test oracle's models.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a built-in text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CORPUS = """splitserve splits each prompt into chunks for a prefill worker group and streams tokens
from a decode worker group. The paged key value cache moves between them in fixed-size blocks.
Continuous batching fills every step up to a token budget: decode tokens first, then prompt chunks.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
héllo wörld, 你好，世界 🙂 numbers 0123456789 and symbols (){}[]<>=+-*/%!?.,;:'"
""".splitlines()

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (every UTF-8 string encodes) with ``vocab_size`` entries at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def hf_config(family: str, **overrides: Any) -> Any:
    """A small transformers config of ``family``; ``overrides`` set any of its fields."""
    import transformers

    common = dict(vocab_size=512, initializer_range=0.3, tie_word_embeddings=False)
    if family == "gpt2":
        base = dict(n_embd=64, n_head=4, n_layer=2, n_positions=1024, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Config(**{**common, **base, "tie_word_embeddings": True, **overrides})
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    if family not in cls:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
    )
    return cls[family](**{**common, **base, **overrides})


def write_checkpoint(path: str | Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Random weights (seeded) of a small ``family`` model plus a tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer(min(config.vocab_size, 512)).save_pretrained(path)
    return path


def write_demo_model(path: str | Path) -> Path:
    """The checkpoint that ``splitserve serve`` runs by default: a Llama of 4 layers, 256 wide."""
    return write_checkpoint(
        path, "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.05,
    )
