#!/usr/bin/env bash
# Feature extraction on several processes (GPUs or CPU cores) with torchrun: each process takes
# a shard of whole batches, writes a resumable part file, and rank 0 merges them into OUT.
# The result is the same file a one-process run writes (its world_size attr says NPROC). The same
# launch works for igpt features, score, sample and complete.
#
#   examples/torchrun_extract.sh TOKENS.h5 MODEL OUT.h5 [NPROC]
#
# On a Slurm cluster, see slurm_extract.sbatch (same command, one torchrun per node).
set -euo pipefail
TOKENS=$1
MODEL=$2
OUT=$3
NPROC=${4:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}

# --standalone: a single node; rerunning the same command after a crash resumes every shard.
torchrun --standalone --nproc-per-node="$NPROC" -m igpt_cli extract "$TOKENS" --model "$MODEL" \
    --layer all -o "$OUT" --quiet
