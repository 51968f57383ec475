"""open_clip's side of `genecis encode`'s benchmark: its own transform
(PIL, bicubic, centre crop, CLIP mean/std) and `encode_image` over every
image of a folder, batch by batch, as a researcher's feature script does.
Usage:
  bench_encode_open_clip.py --make DIR N ARCH   # N JPEGs + a random ARCH state dict (DIR/model.pt)
  bench_encode_open_clip.py DIR ARCH BATCH       # encode DIR/images; prints images/s
"""
import os
import sys
import time

import numpy as np
import open_clip
import torch
from PIL import Image

if sys.argv[1] == "--make":
    out, n, arch = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.makedirs(f"{out}/images", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth colour fields (compress like photos), 640 x 480.
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(f"{out}/images/{i:04}.jpg", quality=90)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), f"{out}/model.pt")
    sys.exit(0)

folder, arch, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
model.load_state_dict(torch.load(f"{folder}/model.pt"))
model.eval()
files = sorted(os.listdir(f"{folder}/images"))
t0 = time.perf_counter()
feats = []
with torch.no_grad():
    for i in range(0, len(files), batch):
        x = torch.stack([transform(Image.open(f"{folder}/images/{f}")) for f in files[i : i + batch]])
        feats.append(model.encode_image(x))
dt = time.perf_counter() - t0
print(f"open_clip {arch}: {len(files)} images in {dt:.2f} s = {len(files) / dt:.2f} images/s ({torch.get_num_threads()} threads)")
