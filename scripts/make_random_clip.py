"""A CLIP with random weights at a real size, in OpenAI's layout, for
benchmarks and for trying a pipeline without downloading weights.
Usage: make_random_clip.py OUT.pt [ViT-B/16|RN50x4]

The configurations are those build_model infers from the released
checkpoints; the weights are random (seeded), so the embeddings mean nothing.
"""
import importlib.util
import os
import sys

import torch

CONFIGS = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80, vision_patch_size=None,
                   context_length=77, vocab_size=49408, transformer_width=640, transformer_heads=10, transformer_layers=12),
}

out = sys.argv[1]
arch = sys.argv[2] if len(sys.argv) > 2 else "ViT-B/16"
pkg = importlib.util.find_spec("clip").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("clip_model", os.path.join(pkg, "model.py"))
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
torch.manual_seed(0)
model = mod.CLIP(**CONFIGS[arch]).float().eval()
torch.save(model.state_dict(), out)
print(f"{arch} with random weights -> {out}")
