"""Batched augmentation for in-memory image tensors (Fashion-MNIST): random horizontal
flips and random shifts of up to ``max_shift`` pixels, as one affine resampling of the
whole batch (no per-image Python work). Image folders use timm's train transform instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def flip_shift(x: Tensor, gen: torch.Generator, max_shift: int = 2) -> Tensor:
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (torch.rand(b, generator=gen) < 0.5).float() * 2 - 1
    theta[:, 1, 1] = 1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift
    theta[:, 0, 2] = shift[:, 0] * 2 / w  # normalised coordinates span 2 over the width
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
