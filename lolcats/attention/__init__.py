"""Swapped attention modules and their decode cache."""

from lolcats.attention.cache import LolcatsCacheLayer, layer_state
from lolcats.attention.hybrid import LolcatsAttention, token_validity

__all__ = ["LolcatsAttention", "LolcatsCacheLayer", "layer_state", "token_validity"]
