"""The model folder as the gateway sees it: tokenizer.json (via `tokenizers`, no torch) and context limits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


class ModelFolderError(ValueError):
    """The model folder lacks a file the gateway needs, or one is malformed; one-line message."""


@dataclass(frozen=True)
class ModelSpec:
    """What validation needs to know about the model; lengths are in tokens."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]


class TextTokenizer:
    """Encodes prompts and decodes outputs with the folder's tokenizer.json.

    ``decode`` matches ``IncrementalDetokenizer``'s Tokenizer protocol; the `tokenizers` library
    does no clean-up of spaces, as the detokenizer requires.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, model_dir: str | Path) -> TextTokenizer:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ModelFolderError(f"{path} not found: the gateway needs the model's tokenizer.json")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:
            raise ModelFolderError(f"cannot load {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def load_model_spec(model_dir: str | Path, max_model_len: int | None = None) -> ModelSpec:
    """Reads config.json (and generation_config.json for EOS); ``max_model_len`` caps the context."""
    config = _read_json(Path(model_dir) / "config.json", required=True)
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    generation = _read_json(Path(model_dir) / "generation_config.json", required=False)
    if not isinstance(config.get("vocab_size"), int):
        raise ModelFolderError(f"{model_dir}/config.json has no integer vocab_size")
    context = _context_len(config)
    if context is None:
        raise ModelFolderError(f"{model_dir}/config.json has neither max_position_embeddings nor n_positions")
    if max_model_len is not None:
        context = min(context, max_model_len)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    return ModelSpec(config["vocab_size"], context, _id_set(eos))


def _context_len(config: dict[str, Any]) -> int | None:
    n = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(n, int):
        return None
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < n:
        n = window
    return int(n)


def _id_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelFolderError(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return data
