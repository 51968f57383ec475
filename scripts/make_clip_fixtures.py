"""Tiny CLIP models in OpenAI's layout, a Combiner, and reference outputs,
for the Rust parity tests. Usage: make_clip_fixtures.py OUT_DIR

Uses OpenAI's model code from the `openai-clip` package (installed by
scripts/setup.sh with --no-deps; its model.py needs only torch) and the
package's BPE tokenizer (ftfy, regex). Everything is seeded: rerunning gives
the same files.
"""
import os
import sys

import torch
import torch.nn as nn

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_models import Combiner, load_clip_module as load, tokens_batch  # noqa: E402

clip_model = load("model")
torch.manual_seed(0)
CONFIGS = {
    "vit": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8),
    "rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=64, vision_patch_size=None),
}
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)  # heads = width // 64, as build_model infers


for name, cfg in CONFIGS.items():
    model = clip_model.CLIP(**cfg, **TEXT).float().eval()
    # BatchNorm statistics other than the defaults, so eval-mode BN is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    res = cfg["image_resolution"]
    images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(2))
    tokens = tokens_batch(3)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
    sd = model.state_dict()
    torch.save(sd, f"{out}/{name}_state.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, f"{out}/{name}_module_state.pt")
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    traced.save(f"{out}/{name}_jit.pt")
    torch.save({"images": images, "tokens": tokens, "image_features": img, "text_features": txt}, f"{out}/{name}_ref.pt")


torch.manual_seed(3)
comb = Combiner(32, proj=64, hidden=128).eval()
image = torch.randn(4, 32)
text = torch.randn(4, 32)
with torch.no_grad():
    combined = comb(image, text)
torch.save(comb.state_dict(), f"{out}/combiner_state.pt")
torch.save({"image": image, "text": text, "combined": combined}, f"{out}/combiner_ref.pt")

# Tokenizer: clip.tokenize(truncate=True) semantics on the package's BPE.
tok = load("simple_tokenizer").SimpleTokenizer()
texts = [
    "a photo of a dog",
    "A Red CAR parked next to a brick building!",
    "on beach",
    "café crème — naïve résumé",
    "  spaces   and\ttabs  ",
    "",
    " ".join(["word"] * 100),
]
sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
rows = []
for t in texts:
    ids = [sot] + tok.encode(t) + [eot]
    if len(ids) > 77:
        ids = ids[:77]
        ids[-1] = eot
    rows.append(ids + [0] * (77 - len(ids)))
torch.save({"tokens": torch.tensor(rows)}, f"{out}/tokenizer_ref.pt")
with open(f"{out}/tokenizer_texts.txt", "w", encoding="utf-8") as f:
    for t in texts:
        f.write(t.replace("\t", "\\t") + "\n")
print(f"fixtures written to {out}")

# Preprocessing (Pillow 10.4, pinned by setup.sh): PIL's bicubic resize of the shorter side + centre crop (what
# torchvision's Resize/CenterCrop do on PIL images), on generated PNG and JPEG
# files; pixels before normalisation.
from PIL import Image

g = torch.Generator().manual_seed(4)
pre = {}
for i, (w, h) in enumerate([(37, 53), (200, 120), (64, 64), (301, 199), (40, 400)]):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    noise = torch.randint(0, 64, (h, w, 3), generator=g)
    arr = ((base + noise) % 256).to(torch.uint8)
    img = Image.frombytes("RGB", (w, h), bytes(arr.flatten().tolist()))
    for ext in ("png", "jpg"):
        path = f"{out}/pre_{i}.{ext}"
        img.save(path, quality=90) if ext == "jpg" else img.save(path)
        src = Image.open(path)
        n = 32
        if w <= h:
            size = (n, int(n * h / w))
        else:
            size = (int(n * w / h), n)
        r = src.resize(size, Image.BICUBIC)
        left = int(round((size[0] - n) / 2.0))
        top = int(round((size[1] - n) / 2.0))
        c = r.crop((left, top, left + n, top + n)).convert("RGB")
        pre[f"pre_{i}_{ext}"] = torch.tensor(list(c.tobytes()), dtype=torch.uint8).view(n, n, 3)
torch.save(pre, f"{out}/preprocess_ref.pt")
