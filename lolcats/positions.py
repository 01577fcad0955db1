"""Training at shifted positions, so the feature maps meet every rotary angle the model will decode at.

Hedgehog feature maps read q and k *after* rotary embeddings, and a map is not rotation-equivariant: φ_q(q_i)
·φ_k(k_j) depends on the absolute positions i and j, not only on i − j. Chunks that always start at
position 0 show the maps only the angles of the first ``seq_len`` positions; past them the slow rotary
frequencies turn to angles never trained on and the linear term fails (SmolLM2, demo recipe: the same
1,024 tokens score perplexity 60 at positions 0–1k, 123 at 2k–3k and 529 at 6k–7k). Softmax attention
depends only on i − j, so the teacher's output is the same at any offset: shifting a training chunk's
positions by a random offset costs nothing and covers the angles up to ``offset + seq_len``.

The offset of a chunk is a pure function of its tokens and the seed, so a resumed run sees the same
offsets as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lolcats.attention import find_decoder_layers


def check_position_offset(data, limit: int | None) -> None:
    """ValueError naming ``data.max_position_offset`` when shifted chunks would run past the model's positions."""
    if data.max_position_offset and limit is not None and data.max_position_offset + data.seq_len > limit:
        raise ValueError(f"data.max_position_offset={data.max_position_offset} + data.seq_len={data.seq_len} is past "
                         f"the model's {limit} positions; set data.max_position_offset={max(limit - data.seq_len, 0)} "
                         "or lower")


def chunk_offset(input_ids: Tensor, max_offset: int, seed: int) -> int:
    """An offset in [0, max_offset] drawn from a hash of the chunk's tokens and the seed."""
    digest = hashlib.sha256(str(seed).encode() + input_ids.detach().cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") % (max_offset + 1)


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (it turns ``position_ids`` into rotary embeddings)."""
    layers = find_decoder_layers(model)
    for module in model.modules():
        if getattr(module, "layers", None) is layers:
            return module
    raise ValueError(f"{type(model).__name__}: no module holds the decoder layers as `.layers`")


@contextlib.contextmanager
def shifted_positions(model: nn.Module, max_offset: int, seed: int) -> Iterator[None]:
    """Within the context, a forward pass on ``input_ids`` without ``position_ids`` and without a cache runs at
    positions ``offset … offset + T − 1`` (:func:`chunk_offset`); ``max_offset`` 0 changes nothing."""
    if max_offset <= 0:
        yield
        return

    def shift(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None:
            return None
        offset = chunk_offset(ids, max_offset, seed)
        kwargs["position_ids"] = (torch.arange(ids.shape[1], device=ids.device) + offset).expand(ids.shape[0], -1)
        return args, kwargs

    handle = _decoder(model).register_forward_pre_hook(shift, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
