#!/usr/bin/env bash
# Does generating better mean representing better? Train a small iGPT keeping a model every few steps,
# then measure each kept model's generative loss and linear-probe accuracy (the paper's central figure).
#
#   examples/sweep.sh IMAGES [OUT] [STEPS]
#
# IMAGES  a dataset with train and test splits (the shipped demo: igpt_cli/assets/demo-cifar10.tar)
# STEPS   training steps (default 300); a model is kept every STEPS/5 steps
# PER_CLASS=N (environment): only N images of each class (a quick try)
# For real runs: more steps and --save-at 50,100,200,400,800,1600,2400 (log-spaced), a bigger
# model, several families (igpt sweep big=runs/big small=runs/small ...). Rerunning resumes.
set -euo pipefail
IMAGES=$1
OUT=${2:-sweep-out}
STEPS=${3:-300}
PER_CLASS=${PER_CLASS:+--limit-per-class $PER_CLASS --shuffle}
mkdir -p "$OUT"

igpt quantize "$IMAGES" --split train --size 8 $PER_CLASS -o "$OUT/train.h5" --overwrite --quiet
igpt quantize "$IMAGES" --split test --size 8 $PER_CLASS -o "$OUT/test.h5" --overwrite --quiet
if [ ! -f "$OUT/run/train_meta.json" ]; then
  igpt train "$OUT/train.h5" --val "$OUT/test.h5" -o "$OUT/run" --depth 2 --width 64 --heads 4 \
    --steps "$STEPS" --batch-size 32 --lr 3e-3 --warmup 20 --save-every $((STEPS / 5)) --quiet > /dev/null
fi
igpt sweep "$OUT/run" --train "$OUT/train.h5" --test "$OUT/test.h5" -o "$OUT/sweep" > "$OUT/sweep.json"
python - "$OUT/sweep.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for c in d["checkpoints"]:
    print(f"step {c['step']:>5}: loss {c['loss_bits']:.3f} bits/token, best layer {c['best_layer']} "
          f"test accuracy {c['best_test_acc']:.1%}")
for c in d["correlations"]:
    print(f"{c['family']}: Pearson r {c['pearson_r']}, Spearman rho {c['spearman_rho']}, n = {c['n']}")
print("figures:", d["files"]["loss_plot"], d["files"]["layer_plot"])
PY
