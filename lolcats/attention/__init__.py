"""Swapped attention modules and their decode cache."""

from lolcats.attention.cache import LolcatsCache, LolcatsCacheLayer, cache_nbytes, layer_state
from lolcats.attention.hybrid import LolcatsAttention, token_validity

__all__ = ["LolcatsAttention", "LolcatsCache", "LolcatsCacheLayer", "cache_nbytes", "layer_state", "token_validity"]
