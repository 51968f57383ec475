"""An evaluation parity fixture: a small random CLIP (OpenAI's model code,
ViT at 224 px) and a random Combiner saved as a `module.`-prefixed state dict,
real JPEG files in the COCO and Visual Genome layouts (several sizes, some
grayscale), templates for the four GeneCIS tasks, and the scores a Python
transcription of the original evaluation gives them.

    .venv/bin/python scripts/make_eval_fixtures.py OUT_DIR

The transcription follows facebookresearch/genecis: images opened with
`Image.open`, VAW crops as datasets/vaw_dataset.py makes them, CLIP's
preprocessing with torchvision (Resize(224, BICUBIC), CenterCrop, RGB,
ToTensor, Normalize), `clip.tokenize(truncate=True)` token ids, and
eval/eval_functions.py::validate with the Combiner or
utils/model_utils.py::FeatureComb (image_only, text_only, image_plus_text
with feature_comb_average 0.5 on raw features). Writes refs.json:
{task: [{"template_id", "method", "target_rank", "similarities"}]}.
Seeded: the same files every run.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_models import Combiner, load_clip_module as load  # noqa: E402

clip_model = load("model")
tok = load("simple_tokenizer").SimpleTokenizer()
torch.manual_seed(11)
model = clip_model.CLIP(
    embed_dim=48, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2,
).float().eval()
torch.save(model.state_dict(), f"{out}/clip_vit224.pt")


torch.manual_seed(12)
combiner = Combiner(48, proj=96, hidden=192).eval()
# As the original's DistributedDataParallel checkpoints store it.
torch.save({"module." + k: v for k, v in combiner.state_dict().items()}, f"{out}/combiner_module.pt")

# Images: structured colour fields plus noise, so features differ.
rng = np.random.default_rng(13)


def picture(w, h, gray=False):
    yy, xx = np.mgrid[0:h, 0:w]
    c = rng.integers(0, 256, size=3)
    f = rng.uniform(0.01, 0.2, size=3)
    base = np.stack([np.sin(xx * f[0] + c[0]) * 100 + c[0] / 2, np.cos(yy * f[1] + c[1]) * 100 + c[1] / 2, np.sin((xx + yy) * f[2]) * 100 + c[2] / 2], -1)
    arr = np.clip(base + 60 + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr[:, :, 0], "L") if gray else Image.fromarray(arr)


sizes = [(640, 480), (500, 375), (427, 640), (300, 300), (333, 500), (612, 612)]
os.makedirs(f"{out}/coco", exist_ok=True)
os.makedirs(f"{out}/vg", exist_ok=True)
coco_ids = [139 + 17 * i for i in range(30)]
for k, i in enumerate(coco_ids):
    w, h = sizes[k % len(sizes)]
    picture(w, h, gray=(k % 7 == 3)).save(f"{out}/coco/{i:012d}.jpg", quality=90)
vg_ids = [2300000 + 11 * i for i in range(20)]
for k, i in enumerate(vg_ids):
    w, h = sizes[(k + 2) % len(sizes)]
    picture(w, h, gray=(k % 6 == 4)).save(f"{out}/vg/{i}.jpg", quality=85)


def vaw(i):
    w, h = sizes[(vg_ids.index(i) + 2) % len(sizes)]
    bw, bh = rng.uniform(20, w / 2), rng.uniform(20, h / 2)
    return {"image_id": int(i), "instance_bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)]}


def coco(i):
    return {"val_image_id": int(i)}


attrs = ["red", "striped", "wooden", "color", "material", "shiny", "pattern"]
objects = ["dog", "cup", "bench", "car", "umbrella", "pizza"]
tasks = {}
for task, ref_of, conds in [("focus_attribute", vaw, attrs), ("change_attribute", vaw, attrs), ("focus_object", coco, objects), ("change_object", coco, objects)]:
    pool = vg_ids if ref_of is vaw else coco_ids
    ts = []
    for j in range(6):
        pick = rng.choice(len(pool), size=16, replace=False)
        ims = [ref_of(pool[p]) for p in pick]
        ts.append({"condition": conds[(j * 3 + len(task)) % len(conds)], "reference": ims[0], "target": ims[1], "gallery": ims[2:]})
    tasks[task] = ts
    with open(f"{out}/{task}.json", "w") as f:
        json.dump(ts, f)

# The original's evaluation, transcribed.
preprocess = T.Compose([
    T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), lambda i: i.convert("RGB"), T.ToTensor(),
    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])


def load_image(spec):
    if "val_image_id" in spec:
        return preprocess(Image.open(f"{out}/coco/{spec['val_image_id']:012d}.jpg"))
    im = Image.open(f"{out}/vg/{spec['image_id']}.jpg")
    x, y, bw, bh = spec["instance_bbox"]
    W, H = im.size
    left, top = max(0, x - 0.7 * bw), max(0, y - 0.7 * bh)
    right, bottom = min(W, left + 1.7 * bw), min(H, top + 1.7 * bh)
    im = im.crop((left, top, right, bottom))
    w, h = im.size
    if w != h:
        side = max(w, h)
        sq = Image.new(im.mode, (side, side), (0,) if im.mode == "L" else (0, 0, 0))
        sq.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        im = sq
    return preprocess(im)


def tokenize(text):
    ids = [tok.encoder["<|startoftext|>"]] + tok.encode(text) + [tok.encoder["<|endoftext|>"]]
    if len(ids) > 77:
        ids = ids[:77]
        ids[-1] = tok.encoder["<|endoftext|>"]
    return torch.tensor([ids + [0] * (77 - len(ids))])


def feature_comb(mode, image_feats, caption_feats, w=0.5):
    if mode == "image_plus_text":
        x = w * image_feats + (1 - w) * caption_feats
    elif mode == "image_only":
        x = image_feats
    else:
        x = caption_feats
    return F.normalize(x, dim=-1)


refs = {}
with torch.no_grad():
    for task, ts in tasks.items():
        rows = []
        for tid, t in enumerate(ts):
            ref_img = load_image(t["reference"])[None]
            gallery_set = torch.stack([load_image(g) for g in [t["target"]] + t["gallery"]])[None]
            caption = tokenize(t["condition"])
            bsz, n_gallery, _, h, w = gallery_set.size()
            imgs_ = torch.cat([ref_img, gallery_set.view(-1, 3, h, w)], dim=0)
            all_img_feats = model.encode_image(imgs_).float()
            caption_feats = model.encode_text(caption).float()
            ref_feats, gallery_feats = all_img_feats.split((bsz, bsz * n_gallery), dim=0)
            gallery_feats = F.normalize(gallery_feats.view(bsz, n_gallery, -1), dim=-1)
            for method in ("image_only", "text_only", "image_plus_text", "combiner"):
                if method == "combiner":
                    combined = combiner(ref_feats, caption_feats)
                else:
                    combined = feature_comb(method, ref_feats, caption_feats)
                sims = (combined[:, None, :] * gallery_feats).sum(-1)
                _, sort_idxs = sims.sort(dim=-1, descending=True)
                rank = int((sort_idxs[0] == 0).nonzero()[0, 0]) + 1
                rows.append({"template_id": tid, "method": method, "target_rank": rank, "similarities": sims[0].tolist()})
        refs[task] = rows

with open(f"{out}/refs.json", "w") as f:
    json.dump(refs, f)
print(f"evaluation fixture written to {out}")
