"""lolcats: linearize Hugging Face causal LMs with LoLCATs (Zhang et al. 2024, arXiv 2410.10254).

Public API:
    convert_model(model, AttentionConfig)  swap every softmax attention for hybrid linear attention
    linearize(LolcatsConfig)               the whole recipe (stage 1 + stage 2) into out_dir
    load(out_dir)                          rebuild a linearized model from an out_dir or export
"""

from lolcats.config import AttentionConfig, LolcatsConfig, load_config
from lolcats.convert import convert_model, find_decoder_layers, linearized_layers, trainable_attention_parameters
from lolcats.models import supported_model_types

__version__ = "0.1.0"


def linearize(config: LolcatsConfig, overwrite: bool = False, progress=None):
    """Run a recipe end to end (see :func:`lolcats.pipeline.linearize`)."""
    from lolcats.pipeline import linearize as run

    return run(config, overwrite=overwrite, progress=progress)


def load(out_dir, base: str | None = None, device: str | None = None):
    """Rebuild a linearized model (see :func:`lolcats.checkpoint.load`)."""
    from lolcats.checkpoint import load as load_checkpoint

    return load_checkpoint(out_dir, base=base, device=device)


__all__ = [
    "AttentionConfig",
    "LolcatsConfig",
    "__version__",
    "convert_model",
    "find_decoder_layers",
    "linearize",
    "linearized_layers",
    "load",
    "load_config",
    "supported_model_types",
    "trainable_attention_parameters",
]
