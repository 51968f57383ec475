"""Textual-inversion parity fixture: random networks of Pic2Word, SEARLE and
LinCIR saved in the formats those projects publish, and the GeneCIS scores
a transcription of their published inference gives on a run's templates.

    .venv/bin/python scripts/make_inversion_fixtures.py RUN CLIP_STATE OUT

RUN is a genecis-rs run folder whose `templates` and `embed` stages are done
(embed with CLIP_STATE, an OpenAI-layout state dict); the raw image features
of its `image_embeddings` are the features those pipelines feed the
networks (`encode_image`, unnormalised).

What is transcribed, file by file:
- Pic2Word's IM2TEXT: google-research/composed_image_retrieval @8c05329,
  model/model.py (Linear, Dropout, ReLU per block, then fc_out); its
  checkpoint as src/main.py saves it ({"epoch", "name", "state_dict",
  "state_dict_img2text", "optimizer"}, DDP's "module." prefix).
- SEARLE's Phi: miccunifi/SEARLE @a9c314b, src/phi.py; saved as
  src/train_phi.py's save_phi does ({"epoch", "Phi"}).
- LinCIR's Phi: navervision/lincir @1dec42d, models.py; saved {"Phi"}.
- The GeneCIS protocol of all three: navervision/lincir branch eval_genecis
  @e6727d9, genecis/eval_functions.py `validate` (prompt
  f"a photo of $ that {rel_caption}" with rel_caption = batch[-1], which
  for the COCO (object) datasets is the collated target_rank tensor, since
  genecis/datasets/coco_dataset.py returns no caption string) and
  `encode_with_pseudo_tokens_HF` (every 259 token's embedding replaced
  before the positional embedding; the EOT row projected), written here
  for OpenAI's module layout as SEARLE's src/encode_with_pseudo_tokens.py
  does; gallery normalised, similarities of the query with each candidate.

- LinCIR's images (genecis/evaluate.py, datasets/*.py @e6727d9): a
  CLIPImageProcessor built by hand (OpenAI's mean and std, bicubic,
  shortest edge and crop at the model's size), applied to the PIL image as
  opened (COCO) or as load_cropped_image crops and pads it (VAW: dilation
  0.7, then expand2square with black), with no convert('RGB') before it;
  reference and gallery alike through the same encode_image.

Writes OUT/{pic2word,searle,lincir}.pt and OUT/expected/part-0.parquet with
(method, variant, task, template_id, similarities): variant "published"
reproduces the object-task prompt as the code builds it, "condition" puts
the condition there; both on the embed stage's features, and again as
"published/lincir" and "condition/lincir" on LinCIR's preprocessing. Similarities are cosines (the query normalised too;
LinCIR leaves it raw, which changes no rank).
"""
import os
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

run, clip_state, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(f"{out}/expected", exist_ok=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_models import load_clip_module as load  # noqa: E402

clip_model = load("model")
tok = load("simple_tokenizer").SimpleTokenizer()


class Phi(nn.Module):
    """SEARLE src/phi.py."""

    def __init__(self, input_dim, hidden_dim, output_dim, dropout):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(p=dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(p=dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x):
        return self.layers(x)


class IM2TEXT(nn.Module):
    """Pic2Word model/model.py."""

    def __init__(self, embed_dim=512, middle_dim=512, output_dim=512, n_layer=2, dropout=0.1):
        super().__init__()
        self.fc_out = nn.Linear(middle_dim, output_dim)
        layers = []
        dim = embed_dim
        for _ in range(n_layer):
            block = [nn.Linear(dim, middle_dim), nn.Dropout(dropout), nn.ReLU()]
            dim = middle_dim
            layers.append(nn.Sequential(*block))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.fc_out(x)


sd = torch.load(clip_state)
# OpenAI's build_model rounds the weights through fp16 (convert_weights);
# the model is built from the state dict's shapes as it infers them, in fp32.
layers = lambda p: len({k.split(".")[p.count(".")] for k in sd if k.startswith(p)})
vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
width = sd["ln_final.weight"].shape[0]
model = clip_model.CLIP(
    embed_dim=sd["text_projection"].shape[1],
    image_resolution=patch * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5),
    vision_layers=layers("visual.transformer.resblocks."), vision_width=vision_width, vision_patch_size=patch,
    context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
    transformer_width=width, transformer_heads=max(width // 64, 1), transformer_layers=layers("transformer.resblocks."),
).float().eval()
model.load_state_dict(sd)
embed_dim, width = model.text_projection.shape[1], model.token_embedding.weight.shape[1]

torch.manual_seed(21)
# Biases and weights well away from 0, so every layer matters.
nets = {
    "pic2word": IM2TEXT(embed_dim, 48, width).eval(),
    "searle": Phi(embed_dim, 4 * embed_dim, width, 0.5).eval(),
    "lincir": Phi(embed_dim, 4 * embed_dim, width, 0.5).eval(),
}
with torch.no_grad():
    for n in nets.values():
        for p in n.parameters():
            p.mul_(3.0)
# Pic2Word's checkpoint, with an AdamW state after one step, as training leaves it.
opt = torch.optim.AdamW(nets["pic2word"].parameters(), lr=1e-4)
nets["pic2word"](torch.randn(2, embed_dim)).sum().backward()
opt.step()
opt.zero_grad()
torch.save({
    "epoch": 1, "name": "pic2word",
    "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
    "state_dict_img2text": {"module." + k: v for k, v in nets["pic2word"].state_dict().items()},
    "optimizer": opt.state_dict(),
}, f"{out}/pic2word.pt")
torch.save({"epoch": 3, "Phi": nets["searle"].state_dict()}, f"{out}/searle.pt")
torch.save({"Phi": nets["lincir"].state_dict()}, f"{out}/lincir.pt")


def tokenize(texts):
    """clip.tokenize(texts, context_length=77), truncate=False: raises when too long."""
    rows = []
    for t in texts:
        ids = [tok.encoder["<|startoftext|>"]] + tok.encode(t) + [tok.encoder["<|endoftext|>"]]
        assert len(ids) <= 77, t
        rows.append(ids + [0] * (77 - len(ids)))
    return torch.tensor(rows)


def encode_with_pseudo_tokens(text, pseudo_tokens):
    x = model.token_embedding(text)
    x = torch.where(text.unsqueeze(-1) == 259, pseudo_tokens.unsqueeze(1).type(x.dtype), x)
    x = x + model.positional_embedding
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection


t = pq.read_table(f"{run}/templates/templates").to_pandas()
t = t[t.gallery_set.isna()]
embed_emb = pq.read_table(f"{run}/embed/image_embeddings").to_pandas().set_index("image_key").embedding

from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402

res = model.visual.input_resolution
processor = CLIPImageProcessor(
    crop_size={"height": res, "width": res}, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
    do_rescale=True, do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size={"shortest_edge": res})


def expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    size = max(width, height)
    result = Image.new(pil_img.mode, (size, size), background_color)
    result.paste(pil_img, ((size - width) // 2, (size - height) // 2))
    return result


def load_cropped_image(path, bbox, dilate=0.7):
    im = Image.open(path)
    x, y, w, h = bbox
    width, height = im.size
    left = max(0, x - dilate * w)
    upper = max(0, y - dilate * h)
    right = min(width, left + (1 + dilate) * w)
    lower = min(height, upper + (1 + dilate) * h)
    im = im.crop((left, upper, right, lower))
    return expand2square(im, (0,) * len(im.getbands()))


keys = pq.read_table(f"{run}/templates/image_keys").to_pandas().drop_duplicates("image_key")
lincir_emb = {}
with torch.no_grad():
    for r in keys.itertuples():
        if pd.isna(r.bbox_x):
            im = Image.open(r.path)
        else:
            im = load_cropped_image(r.path, (r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h))
        px = processor(im, return_tensors="pt")["pixel_values"]
        lincir_emb[r.image_key] = model.encode_image(px)[0].tolist()
lincir_emb = pd.Series(lincir_emb)
rows = []
with torch.no_grad():
  for suffix, emb in (("", embed_emb), ("/lincir", lincir_emb)):
    for (task, group) in t.groupby("task", sort=True):
        ref = torch.tensor(list(map(list, (emb[k] for k in group.reference_key))))
        if task in ("focus_object", "change_object"):
            # COCOValSubset returns (ref, caption tokens, gallery, target_rank): batch[-1].
            published = torch.zeros(len(group), dtype=torch.long)
        else:
            published = list(group.condition)  # VAWValSubset returns the condition string last
        for variant, captions in (("published" + suffix, published), ("condition" + suffix, list(group.condition))):
            text = tokenize([f"a photo of $ that {c}" for c in captions])
            for name, net in nets.items():
                q = encode_with_pseudo_tokens(text, net(ref))
                q = q / q.norm(dim=-1, keepdim=True)
                for i, r in enumerate(group.itertuples()):
                    g = torch.tensor([list(emb[k]) for k in [r.target_key, *r.gallery_keys]])
                    g = g / g.norm(dim=-1, keepdim=True)
                    rows.append((name, variant, task, int(r.template_id), (g @ q[i]).tolist()))
pq.write_table(pa.table({
    "method": [r[0] for r in rows], "variant": [r[1] for r in rows], "task": [r[2] for r in rows],
    "template_id": pa.array([r[3] for r in rows], pa.uint32()), "similarities": [r[4] for r in rows],
}), f"{out}/expected/part-0.parquet")
