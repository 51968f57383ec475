"""The original's training transform per image, single process, for
comparison with `genecis bench augment`: Image.open, then torchvision's
Resize(int(n / 0.875)), RandomResizedCrop(n, scale=(0.9, 1)), RGB, ToTensor,
Normalize (train/train_cc3m.py), as its DataLoader workers run it each epoch.

Usage: bench_train_augment_pil.py DIR [N_PX] [REPEAT]
(make test JPEGs with: bench_preprocess_pil.py --make DIR COUNT)
"""
import os
import sys
import time

import torch
from PIL import Image
from torchvision import transforms as T

torch.set_num_threads(1)
d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 224
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 2
files = sorted(os.path.join(d, f) for f in os.listdir(d))
tf = T.Compose([
    T.Resize(size=int(n / 0.875)),
    T.RandomResizedCrop(size=n, scale=(0.9, 1)),
    lambda im: im.convert("RGB"),
    T.ToTensor(),
    T.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
])
t0 = time.perf_counter()
for _ in range(repeat):
    for f in files:
        tf(Image.open(f))
rate = len(files) * repeat / (time.perf_counter() - t0)
print(f"{len(files)} images x {repeat}, n_px {n}, one process: {rate:.1f} images/s = {rate / 3:.1f} samples/s (3 images each)")
