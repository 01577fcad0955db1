"""Text generation with a linearized (or any) causal LM, with input checks and optional streaming."""

from __future__ import annotations

import torch
from torch import nn


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def position_limit(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def encode_prompt(tokenizer, prompt: str, model: nn.Module, max_new_tokens: int) -> torch.Tensor:
    """(1, T) prompt ids; ValueError for an empty prompt or one past the model's position limit."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; pass some text with --prompt")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    limit = position_limit(model)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens and {max_new_tokens} new tokens are asked for, "
                         f"past the model's position limit of {limit}; shorten the prompt or lower --max-new-tokens")
    return ids


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, streamer=None,
                  stop_strings: list[str] | None = None) -> str:
    """Generate a continuation of ``prompt``; linearized layers decode with a constant-size state."""
    ids = encode_prompt(tokenizer, prompt, model, max_new_tokens)
    device = next(model.parameters()).device
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad_token_id(tokenizer),
                         **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
