"""PyTorch side of the training parity tests: N steps of the original's
train_one_epoch body (train/epoch_train_functions.py) on tiny CLIPs.
Usage: make_train_fixtures.py OUT_DIR

For a tiny ViT and a tiny ModifiedResNet (BatchNorm in train mode) of
OpenAI's code, and a tiny open_clip ViT (GELU, head width 32, LayerScale:
the settings LAION models train with), each with a
small Combiner (dropout off, so both sides compute the same function):
encode [ref; target; distractor] images and the condition tokens, the
contrastive loss with lamda, backward, clip_grad_norm_ on the CLIP
parameters, AdamW over Combiner + CLIP. Writes the initial weights, the
batch, each step's loss and the final weights. Also checks that a Combiner
initialised by `torch.manual_seed(s); Combiner(...)` is what we draw.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_models import Combiner, load_clip_module as load  # noqa: E402

clip_model = load("model")
CONFIGS = {
    "vit": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8),
    "rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=64, vision_patch_size=None),
}
# open_clip's own CLIP class: fine-tuning an open_clip ViT.
OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8, ls_init_value=0.1),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, ls_init_value=0.1),
)
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
# eps well above float noise: a zero-gradient direction (the key bias, a
# bias before a train-mode BatchNorm) then stays put on both sides instead
# of Adam blowing its float noise up to +-lr.
B, STEPS, LR, WD, LAMDA, EPS = 4, 3, 1e-4, 0.01, 100.0, 1e-6

def build(name):
    if name == "oc":
        import open_clip.model

        with open(f"{out}/oc.json", "w") as f:
            json.dump(OPEN_CLIP, f)
        return open_clip.model.CLIP(**OPEN_CLIP).float(), OPEN_CLIP["vision_cfg"]["image_size"]
    return clip_model.CLIP(**CONFIGS[name], **TEXT).float(), CONFIGS[name]["image_resolution"]


for name in [*CONFIGS, "oc"]:
    torch.manual_seed(10)
    model, res = build(name)
    comb = Combiner(32, proj=64, hidden=128)
    torch.save(model.state_dict(), f"{out}/{name}_init.pt")
    torch.save(comb.state_dict(), f"{out}/{name}_combiner_init.pt")
    g = torch.Generator().manual_seed(11)
    imgs = torch.randn(3 * B, 3, res, res, generator=g)
    tokens = torch.zeros(B, 77, dtype=torch.long)
    for i in range(B):
        n = 4 + 3 * i
        tokens[i, 0] = 49406
        tokens[i, 1 : n - 1] = torch.randint(1, 49405, (n - 2,), generator=g)
        tokens[i, n - 1] = 49407
    model.train()
    comb.eval()  # dropout off
    clip_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(list(comb.parameters()) + list(model.parameters()), lr=LR, weight_decay=WD, eps=EPS)
    losses = []
    for step in range(STEPS):
        ref, target, _distractor = model.encode_image(imgs).chunk(3)
        caption = model.encode_text(tokens)
        combined = F.normalize(comb(ref, caption), p=2, dim=-1)
        target = F.normalize(target, p=2, dim=-1)
        logits = LAMDA * combined @ target.t()
        loss = torch.nn.CrossEntropyLoss()(logits, torch.arange(B))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        opt.step()
    torch.save({"images": imgs, "tokens": tokens, "losses": torch.tensor(losses, dtype=torch.float64)}, f"{out}/{name}_batch.pt")
    torch.save(model.state_dict(), f"{out}/{name}_final.pt")
    torch.save(comb.state_dict(), f"{out}/{name}_combiner_final.pt")

# The optimizer's arithmetic alone, on gradients given to both sides (no
# forward or backward, so nothing but elementwise rounding differs): per
# step, clip_grad_norm_ on a subset, then AdamW. lr * wd is large so a
# missing weight decay shows; the gradients' scale changes from step to step
# so the clipping coefficient changes and a clip in the wrong place shows;
# some gradient elements are exactly zero and "skipped" has no gradient at
# step 1, which PyTorch skips.
OPT_LR, OPT_WD, OPT_STEPS, OPT_SCALES = 1e-3, 0.1, 4, (1.0, 20.0, 0.05, 3.0)
g = torch.Generator().manual_seed(12)
params = {
    "w": torch.nn.Parameter(0.5 * torch.randn(64, 32, generator=g)),
    "b": torch.nn.Parameter(torch.randn(32, generator=g)),
    "ln": torch.nn.Parameter(1.0 + 0.1 * torch.randn(32, generator=g)),
    "skipped": torch.nn.Parameter(torch.randn(16, generator=g)),
}
opt_out = {f"init.{k}": p.detach().clone() for k, p in params.items()}
opt = torch.optim.AdamW(list(params.values()), lr=OPT_LR, weight_decay=OPT_WD, eps=EPS)
for step, scale in enumerate(OPT_SCALES[:OPT_STEPS]):
    for k, p in params.items():
        if k == "skipped" and step == 0:
            p.grad = None
            continue
        grad = scale * torch.randn(p.shape, generator=g)
        grad[..., :3] = 0.0
        p.grad = grad
        opt_out[f"grad{step}.{k}"] = grad.clone()
    torch.nn.utils.clip_grad_norm_([params["w"], params["b"]], 1.0)
    opt.step()
opt_out.update({f"final.{k}": p.detach().clone() for k, p in params.items()})
opt_out["hyper"] = torch.tensor([OPT_LR, OPT_WD, EPS, OPT_STEPS], dtype=torch.float64)
torch.save(opt_out, f"{out}/optimizer.pt")

# Combiner initialisation: the draws of torch.manual_seed(5); Combiner(...).
torch.manual_seed(5)
torch.save(Combiner(32, proj=64, hidden=128).state_dict(), f"{out}/combiner_seed5.pt")
print(f"train fixtures written to {out}")
