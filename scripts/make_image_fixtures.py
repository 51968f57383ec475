"""Image files in the modes and encodings the benchmarks meet, and the pixels
the original's pipeline makes of them, for tests/it/model.rs.

    .venv/bin/python scripts/make_image_fixtures.py OUT_DIR

The reference is a transcription of the original: `Image.open` (no EXIF
rotation), for attribute keys the VAW crop (datasets/vaw_dataset.py:
dilation 0.7, `expand2square` with (0,) for L and (0, 0, 0) otherwise, in
the image's own mode), then CLIP's transform up to the pixels: torchvision's
Resize(n, BICUBIC), CenterCrop(n), convert("RGB"). ToTensor and Normalize
are plain arithmetic on these bytes and are left out. Writes the files and
refs.json: [{"file", "bbox" or null, "n", "rgb": hex of n*n*3 bytes}], and,
for truncated files, "error": true. Deterministic: the same bytes every run.
"""
import json
import os
import sys

import numpy as np
import torchvision.transforms as T
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)


def picture(w, h, bands=3):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 7 % 256, (xx * yy) % 256], -1)
    noise = rng.integers(0, 64, size=(h, w, 4))
    return ((base + noise) % 256).astype(np.uint8)[:, :, :bands]


def original(path, bbox, n):
    im = Image.open(path)
    if bbox is not None:
        x, y, bw, bh = bbox
        W, H = im.size
        left, top = max(0, x - 0.7 * bw), max(0, y - 0.7 * bh)
        right, bottom = min(W, left + 1.7 * bw), min(H, top + 1.7 * bh)
        im = im.crop((left, top, right, bottom))
        bg = (0,) if im.mode == "L" else (0, 0, 0)
        w, h = im.size
        if w != h:
            side = max(w, h)
            sq = Image.new(im.mode, (side, side), bg)
            sq.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            im = sq
    tf = T.Compose([T.Resize(n, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n), lambda i: i.convert("RGB")])
    return tf(im).tobytes()


files = []  # (name, bbox or None, n)


def save(name, img, boxes=(None,), n=32, **kw):
    img.save(os.path.join(out, name), **kw)
    for b in boxes:
        files.append((name, b, n))


rgb = [Image.fromarray(picture(w, h)) for w, h in [(37, 53), (301, 199), (64, 64), (40, 400)]]
box = [12.5, 20.0, 10.0, 14.0]
edge = [280.0, 150.0, 20.0, 40.0]
for i, im in enumerate(rgb):
    save(f"rgb420_{i}.jpg", im, boxes=(None, box) if i == 1 else (None,), quality=90)
save("rgb444.jpg", rgb[1], boxes=(None, box, edge), quality=75, subsampling=0)
save("rgb422.jpg", rgb[1], quality=85, subsampling=1)
save("progressive.jpg", rgb[1], quality=80, progressive=True)
save("optimized.jpg", rgb[0], quality=95, optimize=True)
big = Image.fromarray(picture(640, 480))
save("big.jpg", big, boxes=(None, [100.0, 80.0, 120.0, 60.0]), n=224, quality=90)
gray = Image.fromarray(picture(301, 199, 1)[:, :, 0], "L")
save("gray.jpg", gray, boxes=(None, box, edge), quality=88)
cmyk = Image.fromarray(picture(301, 199, 4), "CMYK")
save("cmyk.jpg", cmyk, boxes=(None, box), quality=90)
exif = Image.Exif()
exif[0x0112] = 6  # "rotate 90": Image.open does not apply it
save("exif_rotated.jpg", rgb[0], exif=exif, quality=90)
save("rgb.png", rgb[1], boxes=(None, box))
save("gray.png", gray, boxes=(None, box))
save("palette.png", rgb[1].quantize(48, dither=Image.Dither.NONE))
rgba = Image.fromarray(picture(301, 199, 4), "RGBA")
save("rgba.png", rgba, boxes=(None, box))
save("la.png", Image.fromarray(picture(64, 37, 4)[:, :, :2], "LA"))

refs = []
for name, bbox, n in files:
    refs.append({"file": name, "bbox": bbox, "n": n, "rgb": original(os.path.join(out, name), bbox, n).hex()})

# A truncated JPEG: Pillow refuses it ("image file is truncated").
data = open(os.path.join(out, "rgb420_1.jpg"), "rb").read()
open(os.path.join(out, "truncated.jpg"), "wb").write(data[: len(data) // 2])
try:
    original(os.path.join(out, "truncated.jpg"), None, 32)
    raise SystemExit("Pillow decoded a truncated JPEG; the fixture expects an error")
except OSError:
    refs.append({"file": "truncated.jpg", "bbox": None, "n": 32, "error": True})

with open(os.path.join(out, "refs.json"), "w") as f:
    json.dump(refs, f, indent=0)
print(f"{len(refs)} image references written to {out}")
