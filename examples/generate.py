"""Generation and likelihood from Python: sample, complete and score images with an iGPT.

    python examples/generate.py [MODEL] [DATA] [OUT]

Defaults: the small iGPT (8x8 images) and the CIFAR-10 subset that ship with igpt,
./generate-out. Runs in seconds on a CPU.
"""
import sys
from pathlib import Path

import igpt_cli as igpt
from igpt_cli.demo import DEMO_DATA, SHIPPED_MODEL
from igpt_cli.generate import complete_file, complete_images, sample_file, score_file, score_images

model = sys.argv[1] if len(sys.argv) > 1 else SHIPPED_MODEL
data = sys.argv[2] if len(sys.argv) > 2 else DEMO_DATA
out = Path(sys.argv[3] if len(sys.argv) > 3 else "generate-out")
out.mkdir(exist_ok=True)

# test images at the model's resolution, quantized with the model's own palette
igpt.quantize_dataset(data, out / "test.h5", split="test", size=8, palette=model, limit=64, overwrite=True)

# unconditional samples: a tokens file (same schema as quantize's) and a PNG grid
s = sample_file(model, 16, out / "samples.h5", png=out / "samples.png", temperature=1.0, seed=0, overwrite=True)
print(f"sampled {s.n} images at {s.tokens_per_s:.0f} tokens/s -> {s.png}")

# completions: keep the top half of each image, sample the bottom half 3 times
c = complete_file(out / "test.h5", model, out / "completions.h5", keep_fraction=0.5, n=3,
                  png=out / "completions.png", limit=8, seed=0, overwrite=True)
print(f"completed {c.n_images} images x {c.samples_per_image} -> {c.png}")

# the generative loss: mean cross-entropy per token, per image and over the set
r = score_file(out / "test.h5", model, out / "scores.h5", overwrite=True)
print(f"test NLL {r.nats_per_token:.3f} ± {r.nats_per_token_se:.3f} nats/token = {r.bits_per_token:.3f} bits/token")

# the same in memory: tokens in, tokens (or losses) out
with igpt.formats.open_igpt(out / "test.h5") as f:
    tokens = f["tokens"][:4]
greedy = complete_images(tokens, model, keep_rows=4, n=1, temperature=0)[:, 0]  # [4, 64]
print("greedy completions are likelier than the originals:",
      bool(score_images(greedy, model).mean() < score_images(tokens, model).mean()))
