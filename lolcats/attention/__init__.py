"""Swapped attention modules, their decode cache, and where a model keeps its attention layers."""

from lolcats.attention.cache import LolcatsCacheLayer, cache_nbytes, layer_state
from lolcats.attention.hybrid import LolcatsAttention, set_sparse_cache, token_validity
from lolcats.attention.layers import LolcatsCache, find_decoder_layers

__all__ = [
    "LolcatsAttention",
    "LolcatsCache",
    "LolcatsCacheLayer",
    "cache_nbytes",
    "find_decoder_layers",
    "layer_state",
    "set_sparse_cache",
    "token_validity",
]
