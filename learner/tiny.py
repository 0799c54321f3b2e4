"""Tiny Qwen2 causal LMs for tests, benchmarks and the embedded default run.

A real `transformers` `Qwen2ForCausalLM` (rotary positions, GQA, RMSNorm, tied embeddings) shrunk to a
hidden size of 64 and 2 layers: about 0.1 M parameters for the 549-token `agent.fakes.tiny_tokenizer()`,
so a forward pass costs a millisecond on one CPU core, yet the server, the weight sync and the learner
exercise the same code paths as a 7B Qwen checkpoint. Nothing is downloaded.

Checkpoints are Hugging Face directories (``config.json`` + ``model.safetensors`` + tokenizer files),
written atomically: a temporary sibling directory is filled, fsynced and renamed into place.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["load_model", "save_model", "shared_tokenizer", "sync_state", "tiny_config", "tiny_model"]


def tiny_config(tokenizer: Any, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 4096) -> Any:
    """A `Qwen2Config` sized for `tokenizer` (vocabulary = every id the tokenizer can produce)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_model(tokenizer: Any, *, seed: int = 0, init_std: float = 0.02, **config: Any) -> nn.Module:
    """A freshly initialised float32 `Qwen2ForCausalLM` in eval mode; the same seed gives the same weights.

    `init_std`: std of the normal init. The default 0.02 (Qwen's) gives near-uniform next-token
    distributions; tests that need peaked ones (stop strings that actually occur, greedy runs that
    differ between two models) pass a larger value such as 0.5.
    """
    from transformers import Qwen2ForCausalLM

    cfg = tiny_config(tokenizer, **config)
    cfg.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.eval()


def sync_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a weight push sends: `named_parameters()` with tied duplicates dropped.

    Names are Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``), which both
    the embedded server and vLLM's ``load_weights`` accept. A tied ``lm_head.weight`` is the same
    tensor as ``model.embed_tokens.weight`` and is sent once, as vLLM's examples do.
    """
    return {name: p.detach() for name, p in model.named_parameters()}


def save_model(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str]) -> Path:
    """Write `model` (safetensors) and `tokenizer` to the directory `path`, atomically; returns it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is read by other processes
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a directory written by `save_model` or any HF checkpoint."""
    from transformers import AutoModelForCausalLM

    from agent.scaffold import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval(), tokenizer


@functools.cache
def shared_tokenizer() -> Any:
    """`agent.fakes.tiny_tokenizer()` built once per process (training it takes about a second)."""
    from agent.fakes import tiny_tokenizer

    return tiny_tokenizer()
