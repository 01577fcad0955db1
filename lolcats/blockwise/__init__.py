"""Block-by-block stage 1 for 70B–405B models (docs/blockwise.md; paper §3.3).

``plan`` reads only the model config; ``precompute`` streams the teacher one layer at a time and writes,
for every block start, the residual-stream hidden states entering it (shards + manifest, see
:mod:`lolcats.shards`); ``train`` trains each block alone from its shards (one block per process under
torchrun, gloo on CPU); ``stitch`` merges the blocks' weights into one ``attention.safetensors`` and
runs stage 2 as ``lolcats linearize`` does.

Why blocks can match joint training: in joint stage 1 the teacher's output flows on, so every layer's
input is the original model's hidden state whatever the feature maps are, and layer l's weights get the
gradient of ``mse_scale · MSE_l / L`` only. A block fed the same hidden states, with each layer's loss
weighted by the same ``1 / L`` (``L`` = linearized layers of the whole model), gets the same gradients;
AdamW is per-parameter, so with a constant learning rate, no global-norm clipping and the same chunk
order its weights follow the joint run's.
"""

from lolcats.blockwise.common import BlockwiseError, block_ranges, check_supported, disk_bytes
from lolcats.blockwise.plan import format_plan, plan
from lolcats.blockwise.precompute import PrecomputeResult, precompute
from lolcats.blockwise.stitch import stitch
from lolcats.blockwise.train import format_summary, train, train_block

__all__ = ["BlockwiseError", "PrecomputeResult", "block_ranges", "check_supported", "disk_bytes", "format_plan", "format_summary",
           "plan", "precompute", "stitch", "train", "train_block"]
