"""Tiny random CLIPs built by the reference libraries themselves, saved as
the files users have, with reference outputs: for the Rust parity tests of
every model family `arch` covers. Usage: make_openclip_fixtures.py OUT_DIR

- open_clip 3.3.0 (open_clip_torch on PyPI): `open_clip.model.CLIP` and
  `CustomTextCLIP` from dict configs, one per distinctive setting (GELU vs
  QuickGELU, head width 80 with a non-integer MLP ratio, LayerScale and the
  pooling/norm/mask/projection options, a ModifiedResNet); state dicts as
  .pt, .safetensors and an open_clip training checkpoint; the configs as
  open_clip model-config JSON.
- transformers 4.57.6: `CLIPModel(CLIPConfig(...))` saved with
  save_pretrained (safetensors; and .bin), a CLIPImageProcessor config.
- The named configs: `open_clip.get_model_config(name)` of every model, to
  check the Rust table against.
- Preprocessing: open_clip's `image_transform` and transformers'
  CLIPImageProcessor on generated image files of odd sizes and modes.

No download: every model is random-initialised (pretrained=None). Seeded.
"""
import json
import os
import sys

import numpy as np
import open_clip
import torch
import transformers
from open_clip.model import CLIP, CustomTextCLIP
from PIL import Image
from safetensors.torch import save_file

from fixture_models import tokens_batch

assert open_clip.__version__ == "3.3.0", open_clip.__version__
assert transformers.__version__ == "4.57.6", transformers.__version__

out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def perturb(model):
    """Every parameter and BatchNorm statistic moved off its initial value,
    so a misplaced bias, gamma or norm shows in the outputs."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
OPEN_CLIP = {
    # LAION-style: nn.GELU, head width 32.
    "vit_gelu": dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8), text_cfg=TEXT),
    "vit_quick": dict(embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8), text_cfg=TEXT),
    # ViT-H-14's head width (80) and ViT-bigG-14's MLP ratio, on fewer layers; text pooled at the first <eot>.
    "hw80": dict(
        embed_dim=48,
        vision_cfg=dict(image_size=32, layers=2, width=160, head_width=80, mlp_ratio=4.9231, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=160, heads=2, layers=2, mlp_ratio=4.9231, pool_type="eos", eos_id=49407),
    ),
    # LayerScale, no ln_pre, average pooling with LayerNorm after it, eps 1e-6; text without the causal
    # mask, pooled at the last position, a projection with bias; the text tower under `text.` (CustomTextCLIP).
    "options": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8, ls_init_value=0.1, no_ln_pre=True,
                        pool_type="avg", final_ln_after_pool=True, norm_kwargs=dict(eps=1e-6)),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, ls_init_value=0.1, no_causal_mask=True,
                      pool_type="last", proj_bias=True, norm_kwargs=dict(eps=1e-6)),
    ),
    # A ModifiedResNet with a 32-wide attention-pool head, GELU text.
    "rn_gelu": dict(embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=64, head_width=32), text_cfg=TEXT),
}

torch.manual_seed(0)
tokens = tokens_batch(3)
for name, cfg in OPEN_CLIP.items():
    cfg = json.loads(json.dumps(cfg))
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(cfg, f, indent=1)
    kw = dict(cfg)
    cls = CustomTextCLIP if kw.pop("custom_text", False) else CLIP
    model = cls(**kw).float().eval()
    perturb(model)
    res = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, f"{out}/{name}.pt")
    if name == "vit_gelu":
        save_file(sd, f"{out}/{name}.safetensors")
        # What open_clip's training script saves (DDP-wrapped, with the optimizer).
        torch.save({"epoch": 1, "name": name, "state_dict": {"module." + k: v for k, v in sd.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, f"{out}/{name}_epoch_1.pt")
    torch.save({"images": images, "tokens": tokens, "image_features": img, "text_features": txt}, f"{out}/{name}_ref.pt")

# Hugging Face CLIPModel: GELU with the current eos rule (first <eot>), and QuickGELU with the legacy
# eos_token_id 2 (argmax), saved as pytorch_model.bin.
HF = {
    "hf_gelu": (dict(hidden_act="gelu"), dict(hidden_act="gelu"), True),
    "hf_quick": (dict(hidden_act="quick_gelu", eos_token_id=2), dict(hidden_act="quick_gelu"), False),
}
for name, (t_extra, v_extra, safe) in HF.items():
    torch.manual_seed(6)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=77, vocab_size=49408, **t_extra),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8, **v_extra),
        projection_dim=32,
    )
    model = transformers.CLIPModel(config).float().eval()
    perturb(model)
    model.save_pretrained(f"{out}/{name}", safe_serialization=safe)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    torch.save({"images": images, "tokens": tokens, "image_features": img, "text_features": txt}, f"{out}/{name}_ref.pt")

# The HF preprocessor beside hf_gelu: another mean and std, the model's size.
HF_MEAN, HF_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_mean=HF_MEAN, image_std=HF_STD)
proc.save_pretrained(f"{out}/hf_gelu")

# open_clip's config of every model it names (the Rust table is checked against these).
named = {}
for n in open_clip.list_models():
    named[n] = open_clip.get_model_config(n)
with open(f"{out}/named_configs.json", "w") as f:
    json.dump(named, f)

# Preprocessing on image files whose sizes make odd crop offsets, in several modes.
OC_MEAN, OC_STD = (0.45, 0.41, 0.38), (0.27, 0.26, 0.28)
with open(f"{out}/preprocess_cfg.json", "w") as f:
    json.dump({"model_cfg": OPEN_CLIP["vit_gelu"], "preprocess_cfg": {"mean": OC_MEAN, "std": OC_STD}}, f)
oc_transform = open_clip.image_transform(32, is_train=False, mean=OC_MEAN, std=OC_STD)
g = torch.Generator().manual_seed(4)
pre = {}
names = []
for i, (w, h, mode) in enumerate([(45, 33, "RGB"), (33, 50, "RGB"), (61, 40, "L"), (40, 71, "P"), (50, 37, "RGBA")]):
    arr = torch.randint(0, 256, (h, w, 3), generator=g).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    img = img.convert(mode) if mode != "P" else img.quantize(64)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.asarray(arr[..., 0]), "L"))
    for ext in ("png", "jpg"):
        if ext == "jpg" and mode in ("P", "RGBA"):
            continue
        path = f"{out}/img_{i}.{ext}"
        img.save(path, quality=90) if ext == "jpg" else img.save(path)
        names.append(os.path.basename(path))
        src = Image.open(path)
        pre[f"openclip/{os.path.basename(path)}"] = oc_transform(src)
        pre[f"hf/{os.path.basename(path)}"] = torch.from_numpy(proc(Image.open(path), return_tensors="np")["pixel_values"][0])
torch.save(pre, f"{out}/preprocess_ref.pt")
with open(f"{out}/images.txt", "w") as f:
    f.write("\n".join(names) + "\n")
with open(f"{out}/done", "w") as f:
    f.write("ok\n")
print(f"fixtures written to {out}")
