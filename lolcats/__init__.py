"""lolcats: linearize Hugging Face causal LMs with LoLCATs (Zhang et al. 2024, arXiv 2410.10254)."""

from lolcats.config import AttentionConfig
from lolcats.convert import convert_model, find_decoder_layers, linearized_layers, trainable_attention_parameters
from lolcats.models import supported_model_types

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "__version__",
    "convert_model",
    "find_decoder_layers",
    "linearized_layers",
    "supported_model_types",
    "trainable_attention_parameters",
]
