"""The architecture facts of a timm VisionTransformer that the meta-network and the
FLOPs counter need, read once from the model, and the check that we can run it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prance.errors import PranceError


@dataclass(frozen=True)
class ArchSpec:
    """Dimensions of the full network.

    ``patch_dim`` is the number of input values one patch embedding reads
    (channels * patch_h * patch_w of the conv that makes the tokens); ``stem_macs`` the
    multiply-accumulates of a convolutional stem before it (hybrid ViTs; 0 for plain
    patch embedding); ``num_prefix_tokens`` counts the class token and any register
    tokens, which token strategies never remove.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix_tokens: int
    has_class_token: bool
    patch_dim: int
    num_classes: int
    global_pool: str
    stem_macs: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens entering block 0."""
        return self.num_patches + self.num_prefix_tokens


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm)


def arch_of(vit: nn.Module) -> ArchSpec:
    """Read an :class:`ArchSpec` from a timm ``VisionTransformer``.

    Raises :class:`PranceError` naming the feature when the model uses something the
    meta-network cannot slice (e.g. a distillation head, attention pooling, SwiGLU).
    """
    from timm.models.vision_transformer import VisionTransformer

    name = type(vit).__name__
    if not isinstance(vit, VisionTransformer) or type(vit).forward_head is not VisionTransformer.forward_head:
        raise PranceError(f"unsupported model class {name}: prance runs plain timm VisionTransformer/DeiT models")
    _check_embedding_and_head(vit)
    _check_blocks(vit.blocks)
    first, pe = vit.blocks[0], vit.patch_embed
    kh, kw = pe.proj.kernel_size
    return ArchSpec(
        depth=len(vit.blocks),
        embed_dim=vit.embed_dim,
        num_heads=first.attn.num_heads,
        head_dim=first.attn.head_dim,
        mlp_hidden=first.mlp.fc1.out_features,
        num_patches=pe.num_patches,
        num_prefix_tokens=vit.num_prefix_tokens,
        has_class_token=vit.has_class_token,
        patch_dim=pe.proj.in_channels * kh * kw,
        num_classes=vit.num_classes,
        global_pool=vit.global_pool,
        stem_macs=stem_macs(vit),
    )


def _unsupported(what: str) -> PranceError:
    return PranceError(f"unsupported model: {what} (prance slices plain pre-norm ViT/DeiT blocks)")


def _check_embedding_and_head(vit) -> None:
    """PranceError unless the embedding, pooling, norms and head are what the
    meta-network slices: one conv patch embedding (or a hybrid stem), learned absolute
    positions, token or average pooling, LayerNorms, a linear head."""
    from timm.layers import HybridEmbed, PatchEmbed

    pe = vit.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or getattr(pe, "dynamic_img_size", False):
        raise _unsupported("patch embedding whose tokens do not come from one conv")
    if isinstance(pe, HybridEmbed):
        if not pe.flatten or getattr(pe, "dynamic_img_pad", False):
            raise _unsupported("hybrid embedding with dynamic padding or a custom output format")
    elif type(pe) is not PatchEmbed:
        raise _unsupported(f"patch embedding {type(pe).__name__}")
    if not (_is_identity(getattr(pe, "norm", None)) or _is_layernorm(pe.norm)):
        raise _unsupported("patch-embedding norm that is not LayerNorm")
    if vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
        raise _unsupported(f"global_pool={vit.global_pool!r}")
    if vit.global_pool == "token" and not vit.has_class_token:
        raise _unsupported("token pooling without a class token")
    if vit.pos_embed is None or vit.dynamic_img_size:
        raise _unsupported("no learned absolute position embedding")
    for mod, what in ((vit.norm_pre, "norm_pre"), (vit.norm, "final norm"), (vit.fc_norm, "fc_norm")):
        if not (_is_identity(mod) or _is_layernorm(mod)):
            raise _unsupported(f"{what} that is not LayerNorm")
    if not isinstance(vit.head, nn.Linear):
        raise _unsupported("a model without a linear classifier head (num_classes=0)")


def _check_blocks(blocks) -> None:
    """PranceError unless every block is a plain pre-norm timm ``Block`` of one width."""
    from timm.layers import LayerScale, Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    first = blocks[0]
    for blk in blocks:
        if type(blk) is not Block:
            raise _unsupported(f"block type {type(blk).__name__}")
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not Attention or attn.gate is not None or not _is_identity(attn.norm):
            raise _unsupported("attention with gating or scale-norm")
        if type(mlp) is not Mlp or not _is_identity(mlp.norm):
            raise _unsupported(f"MLP type {type(mlp).__name__}")
        for ls in (blk.ls1, blk.ls2):
            if not (_is_identity(ls) or isinstance(ls, LayerScale)):
                raise _unsupported("layer scale of an unknown kind")
        if not (_is_layernorm(blk.norm1) and _is_layernorm(blk.norm2)):
            raise _unsupported("block norms that are not LayerNorm")
        if (attn.num_heads, attn.head_dim, mlp.fc1.out_features) != (
            first.attn.num_heads, first.attn.head_dim, first.mlp.fc1.out_features
        ):
            raise _unsupported("blocks of different widths")


def stem_macs(vit: nn.Module) -> int:
    """MACs per image of a hybrid ViT's convolutional stem (fixed: never sliced), measured
    once with FlopCounterMode; 0 for plain patch embedding."""
    backbone = getattr(vit.patch_embed, "backbone", None)
    if backbone is None:
        return 0
    import torch

    from prance.flop_reference import flop_counter

    pe = vit.patch_embed
    was_training = backbone.training
    x = torch.zeros(1, pe.in_chans, *pe.img_size, device=pe.proj.weight.device, dtype=pe.proj.weight.dtype)
    try:
        backbone.eval()
        with torch.no_grad(), flop_counter() as counter:
            backbone(x)
    finally:
        backbone.train(was_training)
    return counter.get_total_flops() // 2
