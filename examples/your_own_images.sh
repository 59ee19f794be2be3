#!/usr/bin/env bash
# Your own images, start to finish: a folder of photos (one sub-folder per class) -> features in one
# command (the model's own size and palette) -> a linear probe -> predictions for new photos.
# Runs offline on the shipped model (igpt-cifar8) and a few photos taken from the demo tar.
#
#   examples/your_own_images.sh [DEMO_TAR] [OUT_DIR] [PER_CLASS]
set -euo pipefail
DEMO=${1:-$(python -c 'import igpt_cli, pathlib; print(pathlib.Path(igpt_cli.__file__).parent / "assets/demo-cifar10.tar")')}
OUT=${2:-your-own-images}
PER_CLASS=${3:-30}
mkdir -p "$OUT"

# 1. "my photos": PER_CLASS pictures of three classes, as plain files in class folders
rm -rf "$OUT/photos" "$OUT/new" "$OUT/.unpack" && mkdir -p "$OUT/.unpack"
tar -xf "$DEMO" -C "$OUT/.unpack" test/cat test/dog test/ship
for c in cat dog ship; do
  mkdir -p "$OUT/photos/$c"
  ls "$OUT/.unpack/test/$c" | head -n "$PER_CLASS" | while read -r f; do cp "$OUT/.unpack/test/$c/$f" "$OUT/photos/$c/"; done
done
mkdir -p "$OUT/new" && cp "$(ls -d "$OUT"/.unpack/test/ship/* | tail -n 1)" "$OUT/new/"   # a photo to classify
rm -rf "$OUT/.unpack"

# 2. which models igpt can name (bundled, and any in the Hugging Face cache)
igpt models

# 3. photos -> features, one command: size 8x8 and palette come from the model
igpt features "$OUT/photos" -m igpt-cifar8 --layer 4,6 -o "$OUT/feats.h5" --overwrite -q

# 4. a linear probe per layer (a stratified 20% held out as the test set)
igpt probe "$OUT/feats.h5" --json > "$OUT/probe.json"
python - "$OUT/probe.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
best = next(l for l in r["layers"] if l["layer"] == r["best_layer"])
print(f"best layer {r['best_layer']}: held-out accuracy {best['test_acc']:.1%}")
PY

# 5. where the features came from (provenance: command, versions, device, time)
igpt info "$OUT/feats.h5" | grep -E '^  (command|created_utc|device_name|source|palette_sha256):'

# 6. predictions for new photos: keep the probes, extract the new photos' layer 6, apply its probe
#    (predict uses the best layer the new features have, and says which)
igpt probe "$OUT/feats.h5" --save-probes "$OUT/probes.h5" --overwrite -q > /dev/null
igpt features "$OUT/new" -m igpt-cifar8 --layer 6 -o "$OUT/new-feats.h5" --overwrite -q
igpt predict "$OUT/new-feats.h5" --probes "$OUT/probes.h5" -o "$OUT/predictions.h5" --overwrite --json \
  > "$OUT/predictions.json"
python - "$OUT/predictions.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["predictions"]:
    print(f"new photo {p['index']} ({p['source']}): {p['name']} ({max(p['probabilities']):.0%})")
PY
