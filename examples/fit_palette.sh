#!/usr/bin/env bash
# A palette for your own domain: iGPT's 512 colours were fit on ImageNet; for, say, microscopy or
# satellite images, fit k-means colours on your data, quantize with them, and look at the result.
#
#   examples/fit_palette.sh IMAGES [OUT] [K]
#
# IMAGES  any dataset igpt reads (folder, .tar/.zip, CIFAR archive, .npz/.npy)
# Pretrain on the tokens with `igpt train OUT/tokens.h5 ...`: the model's palette is then yours.
set -euo pipefail
IMAGES=$1
OUT=${2:-palette-out}
K=${3:-512}
mkdir -p "$OUT"

igpt palette fit "$IMAGES" -k "$K" --size 32 --sample-pixels 1000000 -o "$OUT/palette.npy" --overwrite
igpt quantize "$IMAGES" --palette "$OUT/palette.npy" --size 32 -o "$OUT/tokens.h5" --overwrite --quiet
igpt show "$OUT/tokens.h5" -o "$OUT/tokens.png" --n 64 --overwrite       # the images through the new palette
igpt info "$OUT/tokens.h5"
