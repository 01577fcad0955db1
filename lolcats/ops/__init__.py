"""Pure attention functions on (B, H, T, D) tensors: reference, chunked, recurrent and prefix-reading forms.

``spec`` (window shape and size, scale, chunk size) -> ``masks`` (registered window shapes) ->
``reference`` (quadratic, the definition) -> ``chunked`` (O(T)) -> ``state`` (decode state, prefill) ->
``decode`` (one-token step, T tokens on a state) -> ``prefix`` (a state read by many continuations).
"""

from lolcats.ops.chunked import hybrid_attention_chunked
from lolcats.ops.decode import attend_after, decode_step, extend_state
from lolcats.ops.masks import VARIANTS, WINDOW_SHAPES, WindowShape, window_shape
from lolcats.ops.prefix import attend_on_state
from lolcats.ops.reference import hybrid_attention_reference, hybrid_attention_weights, repeat_kv
from lolcats.ops.spec import AttentionSpec
from lolcats.ops.state import DecodeState, empty_state, prefill_state

__all__ = [
    "VARIANTS",
    "WINDOW_SHAPES",
    "AttentionSpec",
    "DecodeState",
    "WindowShape",
    "attend_after",
    "attend_on_state",
    "decode_step",
    "empty_state",
    "extend_state",
    "hybrid_attention_chunked",
    "hybrid_attention_reference",
    "hybrid_attention_weights",
    "prefill_state",
    "repeat_kv",
    "window_shape",
]
