"""The weight-sharing ViT meta-network on top of timm."""

from prance.models.arch import ArchSpec, arch_of
from prance.models.meta import MetaViT
from prance.models.reorder import reorder_by_importance
from prance.models.subnet import SubNet, SubnetSpace
from prance.models.zoo import DEFAULT_MODEL, create_meta, create_vit

__all__ = [
    "ArchSpec",
    "arch_of",
    "MetaViT",
    "reorder_by_importance",
    "SubNet",
    "SubnetSpace",
    "DEFAULT_MODEL",
    "create_meta",
    "create_vit",
]
