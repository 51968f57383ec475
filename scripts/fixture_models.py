"""What the fixture scripts share: OpenAI's CLIP modules from the
`openai-clip` package (installed by scripts/setup.sh with --no-deps, so its
`clip/__init__.py`, which needs torchvision and pkg_resources, is not
imported), and the Combiner of the original's models/combiner_model.py."""
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

_PKG = importlib.util.find_spec("clip").submodule_search_locations[0]


def load_clip_module(name):
    """`clip/<name>.py` of the openai-clip package, loaded on its own."""
    spec = importlib.util.spec_from_file_location(f"clip_{name}", os.path.join(_PKG, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Combiner(nn.Module):
    """models/combiner_model.py's architecture (ARCHITECTURE.md, "Semantics kept from the original")."""

    def __init__(self, d, proj=2560, hidden=5120):
        super().__init__()
        self.text_projection_layer = nn.Linear(d, proj)
        self.image_projection_layer = nn.Linear(d, proj)
        self.dropout1 = nn.Dropout(0.5)
        self.dropout2 = nn.Dropout(0.5)
        self.combiner_layer = nn.Linear(2 * proj, hidden)
        self.output_layer = nn.Linear(hidden, d)
        self.dropout3 = nn.Dropout(0.5)
        self.dynamic_scalar = nn.Sequential(nn.Linear(2 * proj, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, image, text):
        t = self.dropout1(F.relu(self.text_projection_layer(text)))
        i = self.dropout2(F.relu(self.image_projection_layer(image)))
        raw = torch.cat((t, i), -1)
        c = self.dropout3(F.relu(self.combiner_layer(raw)))
        s = self.dynamic_scalar(raw)
        return F.normalize(self.output_layer(c) + s * text + (1 - s) * image, dim=-1)


def tokens_batch(n):
    """CLIP-tokenised-looking rows: <sot>, random ids, <eot>, zero padding;
    every family's parity is tested on the same text."""
    g = torch.Generator().manual_seed(1)
    t = torch.zeros(n, 77, dtype=torch.long)
    for i in range(n):
        length = 5 + 7 * i
        t[i, 0] = 49406
        t[i, 1 : length - 1] = torch.randint(1, 49405, (length - 2,), generator=g)
        t[i, length - 1] = 49407
    return t
