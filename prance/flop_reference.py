"""The reference FLOPs counter: torch's ``FlopCounterMode`` on a real forward, the
independent check of the analytic counter (:mod:`prance.flops`). A leaf module (torch
only), so the model layer can measure a convolutional stem with it without importing the
cost layer above it."""

from __future__ import annotations

import torch

# Fused attention kernels that some torch releases dispatch to without a FlopCounterMode
# formula: torch 2.14 runs ``F.scaled_dot_product_attention`` on CPU as
# ``aten._scaled_dot_product_flash_attention_for_cpu`` and counts nothing for it, so the
# reference silently lost both attention matmuls. They take (query, key, value, ...) like
# the kernels torch does count, and get torch's own ``sdpa_flop_count``.
_SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A ``FlopCounterMode`` that counts every attention kernel this torch can dispatch to
    (torch's registry, plus :data:`_SDPA_KERNELS` where the registry lacks them)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    missing = {}
    for name in _SDPA_KERNELS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            missing[op] = _sdpa_formula
    return FlopCounterMode(display=False, custom_mapping=missing)


@torch.no_grad()
def measured_gflops(model: torch.nn.Module, images: torch.Tensor, **forward_kwargs) -> float:
    """GFLOPs per image (multiply-accumulates) measured by FlopCounterMode on a real
    forward of ``model(images, **forward_kwargs)``."""
    with flop_counter() as counter:
        model(images, **forward_kwargs)
    return counter.get_total_flops() / 2 / images.shape[0] / 1e9
