"""One-epoch comparison behind the default model's conv stem (docs/benchmarks.md).

Trains the full 12-block, width-96 ViT on Fashion-MNIST for one epoch, once with the
default conv stem (prance_vit_fmnist) and once with a 4x4 patchify embedding of the same
token count, and prints test Top-1.  Usage:
    .venv/bin/python scripts/experiments/stem_vs_patchify.py [stem|patchify ...]
Recipe: AdamW lr 1e-3, weight decay 0.05, batch 128, warm-up 1/3 epoch then cosine to 0,
label smoothing 0.1, gradient clipping 1.0, random horizontal flips and +-2 px shifts.
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from prance.data import FASHION_MNIST_SPEC, fashion_mnist, make_loader
from prance.models import create_vit


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (torch.rand(b, generator=gen) < 0.5).float() * 2 - 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 / 14)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def run(variant: str) -> float:
    torch.manual_seed(0)
    model = create_vit("prance_vit_fmnist") if variant == "stem" else create_vit("prance_vit_micro", patch_size=4, embed_dim=96, depth=12, num_heads=4)
    train = make_loader(fashion_mnist("train", FASHION_MNIST_SPEC), 128, shuffle=True, seed=0, drop_last=True)
    steps, warm = len(train), len(train) // 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    model.train()
    for x, y in train:
        loss = F.cross_entropy(model(augment(x, gen)), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    test = fashion_mnist("test", FASHION_MNIST_SPEC)
    with torch.no_grad():
        for x, y in make_loader(test, 500):
            correct += int((model(x).argmax(-1) == y).sum())
    top1 = 100 * correct / len(test)
    print(f"{variant}: top1 {top1:.1f}% after 1 epoch, {time.time() - t0:.0f} s", flush=True)
    return top1


if __name__ == "__main__":
    for v in sys.argv[1:] or ["stem", "patchify"]:
        run(v)
