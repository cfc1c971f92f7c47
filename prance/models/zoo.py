"""Creating models by timm name, including the small configurations prance registers
with timm for Fashion-MNIST (so that one naming scheme serves everywhere)."""

from __future__ import annotations

import timm
from timm.layers import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from prance.errors import PranceError
from prance.models.arch import arch_of
from prance.models.meta import MetaViT

FASHION_MNIST_CFG = {
    "input_size": (1, 28, 28),
    "mean": (0.2860,),
    "std": (0.3530,),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 10,
}

DEFAULT_MODEL = "prance_vit_fmnist"


def _small_vit(name: str, pretrained: bool, defaults: dict, kwargs: dict) -> VisionTransformer:
    if pretrained:
        raise PranceError(f"{name} has no downloadable weights: train it (sweeps/pretrain.py) or pass --checkpoint")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loader arguments
        kwargs.pop(key, None)
    model = VisionTransformer(**{**defaults, **kwargs})
    model.pretrained_cfg = dict(FASHION_MNIST_CFG, architecture=name, input_size=(model.in_chans,) + tuple(model.patch_embed.img_size))
    return model


def conv_stem(in_chans: int, width: int = 64) -> nn.Sequential:
    """Three 3x3 convs (stride 1, 2, 2) with BatchNorm and GELU: 28x28 -> 7x7 features.

    The "early convolutions" stem (Xiao et al., 2021) in place of a 4x4 patchify: on
    Fashion-MNIST it reached 79.9% after one epoch against 72.8% for the patchify ViT of
    the same width and depth (docs/benchmarks.md), for ~8% more FLOPs.
    """
    half = width // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.GELU(),
        nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.GELU(),
    )  # fmt: skip


@register_model
def prance_vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """12-block hybrid ViT for 28x28 Fashion-MNIST: a 3-conv stem to a 7x7 grid (49 tokens
    + CLS), width 96, 4 heads of 24 channels, MLP 384. The default meta-network."""
    in_chans = kwargs.get("in_chans", 1)
    img_size = kwargs.get("img_size", 28)

    def embed_layer(**k):
        return HybridEmbed(conv_stem(in_chans), img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=k["embed_dim"])

    defaults = dict(img_size=28, patch_size=1, in_chans=1, num_classes=10, embed_dim=96, depth=12, num_heads=4,
                    mlp_ratio=4.0, embed_layer=embed_layer)
    return _small_vit("prance_vit_fmnist", pretrained, defaults, kwargs)


@register_model
def prance_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 4-block, width-32 ViT on 28x28 inputs with 7x7 patches: for tests and smoke runs."""
    defaults = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0)
    return _small_vit("prance_vit_micro", pretrained, defaults, kwargs)


def create_vit(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A timm VisionTransformer by name, in eval mode; :class:`PranceError` for an unknown
    or unsupported name, or when pretrained weights cannot be fetched."""
    if not timm.is_model(name):
        raise PranceError(
            f"unknown model {name!r}: give a timm ViT/DeiT name such as deit_small_patch16_224 "
            f"or {DEFAULT_MODEL} (timm.list_models('*vit*') lists them)"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except PranceError:
        raise
    except Exception as e:  # network, hub or constructor failure: say what and why in one line
        what = "download pretrained weights for" if pretrained else "create"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PranceError(f"could not {what} model {name!r}: {msg}") from e
    arch_of(model)  # raises PranceError if the architecture cannot be sliced
    return model.eval()


def create_meta(name: str, pretrained: bool = False, **kwargs) -> MetaViT:
    """:class:`MetaViT` around ``create_vit(name, ...)``."""
    return MetaViT(create_vit(name, pretrained=pretrained, **kwargs)).eval()
