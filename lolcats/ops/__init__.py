"""Pure attention functions on (B, H, T, D) tensors: reference, chunked and recurrent forms."""

from lolcats.ops.chunked import hybrid_attention_chunked
from lolcats.ops.decode import DecodeState, attend_on_state, decode_step, empty_state, extend_state, prefill_state
from lolcats.ops.masks import VARIANTS, window_and_linear_masks, window_slots
from lolcats.ops.reference import hybrid_attention_reference, repeat_kv

__all__ = [
    "VARIANTS",
    "DecodeState",
    "attend_on_state",
    "decode_step",
    "empty_state",
    "extend_state",
    "hybrid_attention_chunked",
    "hybrid_attention_reference",
    "prefill_state",
    "repeat_kv",
    "window_and_linear_masks",
    "window_slots",
]
