"""Token-level chat framing derived from the tokenizer's own chat template.

An episode is kept as token ids and never re-tokenised: the prompt is rendered by the chat template
once; each turn appends the model's tokens exactly as returned, then the observation's tokens. The
observation's framing (end of the assistant turn, the tool-response turn, the next assistant header)
is found by rendering two probe conversations with the template and cutting at marker strings, so any
template works (ChatML/Qwen, Llama, ...), not only the one this code was written against.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

__all__ = ["ChatFormat", "TextCodec", "Tokenizer", "load_tokenizer"]

_A = "\u00a7ASSISTANT\u00a7"
_O = "\u00a7OBSERVATION\u00a7"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the scaffold uses."""

    eos_token_id: int | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def convert_tokens_to_ids(self, tokens: str) -> int: ...


def load_tokenizer(path: str | Any) -> Any:
    """A Hugging Face tokenizer from a directory or hub id, encoding exactly as its ``tokenizer.json``.

    transformers 5 builds the class of the model type (``Qwen2Tokenizer`` next to a qwen2
    ``config.json``) and gives it that family's pre-tokenisation, replacing the file's: a tokenizer
    trained with other splitting (the shipped tiny policy's merges cross words) then encodes
    differently from the ids its model was trained on. When the loaded pre-tokenizer differs from the
    file's, the file's tokenizer is loaded as is (`PreTrainedTokenizerFast`). Real Qwen checkpoints
    carry the family's own pre-tokenizer, so they load unchanged.
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(path)
    file = Path(str(path)) / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return tokenizer
    wanted = json.loads(file.read_text(encoding="utf-8")).get("pre_tokenizer")
    loaded = json.loads(backend.to_str()).get("pre_tokenizer")
    if wanted == loaded:
        return tokenizer
    faithful = PreTrainedTokenizerFast.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) and not getattr(faithful, "chat_template", None):
        faithful.chat_template = tokenizer.chat_template
    return faithful


@dataclass(frozen=True)
class ChatFormat:
    """Framing strings of one chat template.

    end_of_turn: what closes an assistant turn (``<|im_end|>`` then ``\\n`` for ChatML).
    observation_prefix: what opens the observation turn after a closed assistant turn.
    observation_suffix: what closes it and opens the next assistant turn.
    stop_token_ids: tokens that end an assistant turn when generated.
    """

    end_of_turn: str
    observation_prefix: str
    observation_suffix: str
    observation_role: str
    stop_token_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, observation_role: str = "user") -> ChatFormat:
        base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        closed = tokenizer.apply_chat_template(base + [{"role": "assistant", "content": _A}], tokenize=False)
        followed = tokenizer.apply_chat_template(
            base + [{"role": "assistant", "content": _A}, {"role": observation_role, "content": _O}],
            tokenize=False, add_generation_prompt=True,
        )
        if _A not in closed or _O not in followed:
            raise ValueError("the tokenizer's chat template drops message content; cannot derive the framing")
        end_of_turn = closed.split(_A, 1)[1]
        after_assistant = followed.split(_A, 1)[1]
        prefix_with_end, observation_suffix = after_assistant.split(_O, 1)
        if not prefix_with_end.startswith(end_of_turn.rstrip("\n")):
            raise ValueError(f"unexpected chat template framing: {prefix_with_end!r} after {end_of_turn!r}")
        stop_ids: list[int] = []
        marker = end_of_turn.strip()
        if marker:
            ids = tokenizer.encode(marker, add_special_tokens=False)
            if len(ids) == 1:
                stop_ids.append(ids[0])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
            stop_ids.append(tokenizer.eos_token_id)
        return cls(end_of_turn, prefix_with_end, observation_suffix, observation_role, tuple(stop_ids))

    def observation_text(self, observation: str, *, turn_closed: bool) -> str:
        """The text that follows the model's tokens: closes its turn if it did not, then the observation."""
        prefix = self.observation_prefix
        if turn_closed:
            marker = self.end_of_turn.rstrip("\n")
            prefix = prefix[len(marker):]
        return prefix + observation + self.observation_suffix


class TextCodec:
    """encode/decode for the episode's hot path.

    A Hugging Face fast tokenizer's Python wrapper costs ~80 us per call; its Rust backend gives the
    same ids in a few. Turns encode and decode once each, thousands of times a second.

    `encode` remembers the ids of recent texts (up to `cache_chars` characters of text in all, oldest
    forgotten first): observations repeat across an episode's turns and across the G rollouts of one
    task (the same file viewed, the same test output, the same corrective message), and a long
    observation costs milliseconds to encode. Every call returns a new list.
    """

    def __init__(self, tokenizer: Tokenizer, *, cache_chars: int = 1 << 24) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._encode = lambda text: backend.encode(text, add_special_tokens=False).ids
            self.decode = partial(backend.decode, skip_special_tokens=True)  # no Python frame per turn
        else:
            self._encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.cache_chars = cache_chars
        self._cache: dict[str, array] = {}  # text -> ids (int32), in insertion order
        self._cached_chars = 0
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is not None:
            self.hits += 1
            return ids.tolist()
        self.misses += 1
        out = self._encode(text)
        if len(text) <= self.cache_chars:
            cache = self._cache
            self._cached_chars += len(text)
            while self._cached_chars > self.cache_chars:
                oldest = next(iter(cache))
                del cache[oldest]
                self._cached_chars -= len(oldest)
            cache[text] = array("i", out)
        return out
