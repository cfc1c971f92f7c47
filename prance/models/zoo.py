"""Creating models by timm name, including the small configurations prance registers
with timm for Fashion-MNIST (so that one naming scheme serves everywhere).

prance's models are registered the way timm registers its own (``default_cfgs`` from
``generate_default_cfgs``, built by ``build_model_with_cfg``), so ``features_only``,
``pretrained_cfg`` / ``default_cfg``, ``reset_classifier`` and FX tracing behave as for every
timm model. The weights prance ships are pretrained tags: each names its file in
``prance/checkpoints/`` (package data; in a source checkout a link to ``checkpoints/``), so
``timm.create_model("prance_vit_fmnist", pretrained=True)`` loads the shipped supernet
wherever the package is installed, and :func:`shipped_checkpoint` finds a tag's file by name
(docs/architecture.md, "Shipped checkpoints").
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import timm
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from prance.errors import PranceError
from prance.models.arch import arch_of
from prance.models.meta import MetaViT

DEFAULT_MODEL = "prance_vit_fmnist"
SHIPPED = resources.files("prance") / "checkpoints"  # the folder of shipped weights, in the installed package


def _cfg(file: str | None = None, **kwargs) -> dict:
    """A pretrained config of a Fashion-MNIST model; ``file``: its weights in ``SHIPPED``."""
    return {
        "file": str(SHIPPED / file) if file else None,
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "fixed_input_size": True,
        "pool_size": None,
        "mean": (0.2860,),
        "std": (0.3530,),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


# The first tag of a model is its default (`prance_vit_fmnist` = `prance_vit_fmnist.supernet`).
# The only place the shipped files are named: a retrained checkpoint that replaces one under
# the same file name is picked up everywhere. Records beside each: the same name, .json.
default_cfgs = generate_default_cfgs({
    "prance_vit_fmnist.supernet": _cfg(
        "prance_vit_fmnist_supernet.safetensors", first_conv="patch_embed.backbone.0",
        description="the default meta-network: a supernet down to 25% of the GFLOPs (pretraining preset supernet_shrink)"),
    "prance_vit_fmnist.base": _cfg(
        "prance_vit_fmnist.safetensors", first_conv="patch_embed.backbone.0",
        description="the first meta-network, down to 43% of the GFLOPs (preset default): the CLI's default weights"),
    "prance_vit_micro": _cfg(),  # no weights: tests and smoke runs
})


def _check_weights(variant: str, kwargs: dict) -> None:
    """PranceError, before building, when pretrained weights are asked of a tag that ships none
    (timm would raise a RuntimeError), or whose file is missing (a checkout without it)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if cfg.file:
        if not Path(cfg.file).is_file():
            raise PranceError(f"the shipped checkpoint of {variant} ({cfg.file}) is missing from this installation")
    elif not (cfg.url or cfg.hf_hub_id or cfg.state_dict):
        raise PranceError(f"{variant} has no shipped weights: train it (sweeps/pretrain.py) or pass --checkpoint")


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    """A prance ViT the way timm builds its own: the resolved pretrained_cfg on the model,
    ``features_only`` through timm's feature getter, shipped weights from the tag's file."""
    if pretrained:
        _check_weights(variant, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # timm's ViT filter: resamples pos_embed for another img_size
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


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

    def embed_layer(**k):  # the arguments VisionTransformer gives its patch embedding
        k.pop("norm_layer", None)
        return HybridEmbed(conv_stem(k["in_chans"]), **{**k, "patch_size": 1})

    model_args = dict(img_size=28, patch_size=1, in_chans=1, num_classes=10, embed_dim=96, depth=12, num_heads=4,
                      mlp_ratio=4.0, embed_layer=embed_layer)
    return _create("prance_vit_fmnist", pretrained, **dict(model_args, **kwargs))


@register_model
def prance_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 4-block, width-32 ViT on 28x28 inputs with 7x7 patches: for tests and smoke runs."""
    model_args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0)
    return _create("prance_vit_micro", pretrained, **dict(model_args, **kwargs))


def shipped_checkpoint(name: str) -> Path | None:
    """The checkpoint file prance ships for the timm name ``name`` (``model`` for its default
    tag, or ``model.tag``): its pretrained_cfg's ``file``. None for a model without one;
    PranceError for a tag the model does not have, or a shipped file that is missing."""
    try:
        cfg = get_pretrained_cfg(name.strip())
    except RuntimeError:  # an existing model, an unknown tag
        arch = name.strip().split(".")[0]
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise PranceError(f"{name}: no such pretrained tag (the tags of {arch}: {', '.join(tags) or 'none'})") from None
    if cfg is None or not cfg.file:
        return None
    path = Path(cfg.file)
    if not path.is_file():
        raise PranceError(f"the shipped checkpoint of {name} ({path}) is missing from this installation")
    return path


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
