#!/usr/bin/env bash
# Block-by-block linearization end to end (docs/blockwise.md; paper §3.3), for one node with N processes/GPUs:
#
#   bash scripts/launch_blockwise.sh RECIPE.yaml [N] [key=value ...]
#
#   1. plan        block split, disk need, memory per block (reads only the model config)
#   2. precompute  one teacher pass streaming one layer at a time; writes each block's input hidden states
#                  (resumable: verified shards are kept, corrupt or partial ones rewritten)
#   3. train       N processes under torchrun (gloo on CPU, nccl on GPUs); rank r trains blocks r, r+N, ...
#                  (resumable per block)
#   4. stitch      merge every block's weights into attention.safetensors, then stage 2 (LoRA) and the report,
#                  data-parallel over the N processes (each optimizer step's micro-batches are split over the
#                  ranks and their gradients summed; lora.grad_accum must be a multiple of N)
#
# `accelerate launch --num_processes N -m lolcats.cli …` sets the same environment as torchrun and works too.
# Stage 2 holds a full replica of the base per process, or, with model.sharding: fsdp (the 70B/405B/GRIN recipes),
# only each process's FSDP2 shard of it, read from the checkpoint's safetensors (docs/design.md §3).
#
# On several nodes run step 3 with torchrun's --nnodes/--node_rank/--rdzv_endpoint instead; every node must
# see the hidden-state folder (blockwise.hidden_dir) and out_dir.
set -euo pipefail
recipe=${1:?usage: launch_blockwise.sh RECIPE.yaml [N] [key=value ...]}
nproc=${2:-1}
shift $(( $# >= 2 ? 2 : 1 ))
py=${LOLCATS_PYTHON:-python}
"$py" -m lolcats.cli blockwise plan "$recipe" "$@"
"$py" -m lolcats.cli blockwise precompute "$recipe" "$@"
"$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m lolcats.cli blockwise train "$recipe" "$@"
"$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m lolcats.cli blockwise stitch "$recipe" "$@"
