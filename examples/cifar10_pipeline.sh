#!/usr/bin/env bash
# The CIFAR-10 linear-probe pipeline from a shell: images -> tokens -> features -> per-layer accuracy.
#
#   examples/cifar10_pipeline.sh [DATA] [MODEL] [OUT]
#
# DATA   an image folder / .tar with train/ and test/ splits (default: the CIFAR-10 JPEG tar in ../shared/data)
# MODEL  a Hugging Face ImageGPT directory, e.g. a download of openai/imagegpt-small
#        (default: the small iGPT shipped with igpt, trained on 8x8 CIFAR-10)
# OUT    where every file goes (default: ./cifar10-probe)
# LIMIT  (environment) quantize at most this many images per split, for a quick try
set -euo pipefail

DATA=${1:-../shared/data/cifar10-jpeg.tar}
MODEL=${2:-$(python -c 'import igpt_cli.demo as d; print(d.SHIPPED_MODEL)')}
OUT=${3:-cifar10-probe}
LIMIT_ARGS=${LIMIT:+--limit $LIMIT}
mkdir -p "$OUT"

# 1. Quantize both splits with the model's own palette and resolution (its preprocessor_config.json).
SIZE=$(python -c 'import json, sys; c = json.load(open(sys.argv[1] + "/config.json")); print(int(c["n_positions"] ** 0.5))' "$MODEL")
for split in train test; do
    igpt quantize "$DATA" --split $split --size "$SIZE" --palette "$MODEL" $LIMIT_ARGS \
        -o "$OUT/$split.h5" --overwrite --quiet
done

# 2. Features of every layer (mean over positions of ln_1(h_l), the paper's f_l). Resumable:
#    if this is interrupted, running the same command again continues where it stopped.
for split in train test; do
    igpt extract "$OUT/$split.h5" --model "$MODEL" --layer all -o "$OUT/$split-feats.h5" --overwrite --quiet
done

# 3. One logistic-regression probe per layer, C chosen on 10 % of train; the JSON report on stdout.
igpt probe "$OUT/train-feats.h5" --test "$OUT/test-feats.h5" --plot "$OUT/probe.png" --csv "$OUT/probe.csv" \
    --json --quiet > "$OUT/probe.json"

python - "$OUT/probe.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
best = next(l for l in r["layers"] if l["layer"] == r["best_layer"])
print(f"best layer {best['layer']}: test accuracy {best['test_acc']:.1%}")
PY
