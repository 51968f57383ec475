"""The reference CLIP preprocessing in Python (PIL bicubic resize of the
shorter side, centre crop, RGB, to float, normalise: torchvision's
Resize/CenterCrop/ToTensor/Normalize on PIL images), single process, for
comparison with `genecis bench preprocess`.

Usage: bench_preprocess_pil.py DIR [N_PX] [REPEAT]
       bench_preprocess_pil.py --make DIR COUNT   (writes COUNT test JPEGs)
       bench_preprocess_pil.py --compare DIR DUMP [N_PX]
           (level differences against `genecis bench preprocess DIR --dump DUMP`)
"""
import os
import sys
import time

import numpy as np
from PIL import Image

if sys.argv[1] == "--make":
    out, count = sys.argv[2], int(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = (640, 480) if i % 2 == 0 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) + rng.integers(0, 40, (h, w, 3))
        Image.fromarray((arr % 256).astype(np.uint8)).save(f"{out}/{i:05d}.jpg", quality=90)
    sys.exit(0)

def pil_pixels(f, n):
    im = Image.open(f)
    w, h = im.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    im = im.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
    return np.asarray(im.crop((left, top, left + n, top + n)).convert("RGB"), dtype=np.int32)


if sys.argv[1] == "--compare":
    d, dump = sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 224
    diffs = []
    for f in sorted(os.listdir(d)):
        if not f.endswith((".jpg", ".jpeg", ".png")):
            continue
        ours = np.fromfile(os.path.join(dump, os.path.splitext(f)[0] + ".rgb"), dtype=np.uint8).astype(np.int32)
        diffs.append(np.abs(ours.reshape(n, n, 3) - pil_pixels(os.path.join(d, f), n)))
    a = np.stack(diffs)
    print(f"{len(diffs)} images: max {a.max()} levels, mean {a.mean():.4f}, {np.count_nonzero(a)} of {a.size} values differ")
    sys.exit(0)

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 224
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 3
files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith((".jpg", ".jpeg", ".png")))
mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
t0 = time.time()
count = 0
for _ in range(repeat):
    for f in files:
        im = Image.open(f)
        w, h = im.size
        size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
        im = im.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
        im = im.crop((left, top, left + n, top + n)).convert("RGB")
        x = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std
        x = x.transpose(2, 0, 1)
        count += 1
secs = time.time() - t0
print(f"PIL reference: {count} images to {n}px in {secs:.2f} s, 1 process: {count / secs:.1f} images/s")

# Where the time goes: decode, resize + crop + RGB, normalise.
ims, t0 = [], time.time()
for f in files:
    im = Image.open(f)
    im.load()
    ims.append(im)
dec = time.time() - t0
t0, out = time.time(), []
for im in ims:
    w, h = im.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    r = im.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
    out.append(r.crop((left, top, left + n, top + n)).convert("RGB"))
res = time.time() - t0
t0 = time.time()
for im in out:
    x = ((np.asarray(im, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
norm = time.time() - t0
k = len(files)
print(f"PIL per image: decode {1000 * dec / k:.2f} ms, resize + crop + RGB {1000 * res / k:.2f} ms, normalise {1000 * norm / k:.2f} ms")
