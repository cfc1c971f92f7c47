"""Channel reordering by importance, so that "first-k channels" keeps the best k.

Permuting heads, MLP hidden units or embedding channels consistently across every
weight that reads or writes them leaves the full network's function unchanged
(LayerNorm statistics are permutation invariant), so reordering is safe at any time,
typically once before weight-sharing training.

Importance is weight-magnitude based (no data needed):
- head ``h`` of a block: ||W_v[h]||_F * ||W_proj[:, h]||_F, the gain of its value path;
- MLP hidden unit ``j``: ||fc1.weight[j]|| * ||fc2.weight[:, j]||;
- embedding channel ``c``: the L2 norm of all weights that read or write channel ``c``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _take(p: Tensor | None, order: Tensor, dim: int) -> None:
    if p is not None:
        p.data.copy_(p.data.index_select(dim, order.to(p.device)))


def head_importance(blk: nn.Module) -> Tensor:
    attn = blk.attn
    h, hd = attn.num_heads, attn.head_dim
    wv = attn.qkv.weight.view(3, h, hd, -1)[2]
    wp = attn.proj.weight.view(-1, h, hd)
    return wv.pow(2).sum(dim=(1, 2)).sqrt() * wp.pow(2).sum(dim=(0, 2)).sqrt()


def mlp_importance(blk: nn.Module) -> Tensor:
    return blk.mlp.fc1.weight.norm(dim=1) * blk.mlp.fc2.weight.norm(dim=0)


def permute_heads(blk: nn.Module, order: Tensor) -> None:
    attn = blk.attn
    h, hd = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.data.view(3, h, hd, -1)
    w.copy_(w.index_select(1, order))
    if attn.qkv.bias is not None:
        b = attn.qkv.bias.data.view(3, h, hd)
        b.copy_(b.index_select(1, order))
    p = attn.proj.weight.data.view(-1, h, hd)
    p.copy_(p.index_select(1, order))


def permute_mlp(blk: nn.Module, order: Tensor) -> None:
    _take(blk.mlp.fc1.weight, order, 0)
    _take(blk.mlp.fc1.bias, order, 0)
    _take(blk.mlp.fc2.weight, order, 1)


def _norm_params(norm: nn.Module | None) -> list[Tensor | None]:
    return [] if norm is None or isinstance(norm, nn.Identity) else [norm.weight, norm.bias]


def _embed_writers_readers(vit: nn.Module) -> tuple[list[tuple[Tensor, int]], list[Tensor | None]]:
    """(weights indexed by embedding channel along a dim, 1-D params indexed by it)."""
    conv = vit.patch_embed.proj
    mats: list[tuple[Tensor, int]] = [(conv.weight, 0), (vit.head.weight, 1)]
    vecs: list[Tensor | None] = [conv.bias, *_norm_params(getattr(vit.patch_embed, "norm", None)), *_norm_params(vit.norm_pre)]
    vecs += [*_norm_params(vit.norm), *_norm_params(vit.fc_norm)]
    for blk in vit.blocks:
        mats += [(blk.attn.qkv.weight, 1), (blk.attn.proj.weight, 0), (blk.mlp.fc1.weight, 1), (blk.mlp.fc2.weight, 0)]
        vecs += [blk.attn.proj.bias, blk.mlp.fc2.bias, *_norm_params(blk.norm1), *_norm_params(blk.norm2)]
        vecs += [getattr(blk.ls1, "gamma", None), getattr(blk.ls2, "gamma", None)]
    return mats, vecs


def embed_importance(vit: nn.Module) -> Tensor:
    mats, _ = _embed_writers_readers(vit)
    total = torch.zeros(vit.embed_dim, device=vit.head.weight.device)
    for w, dim in mats:
        other = [d for d in range(w.dim()) if d != dim]
        total += w.detach().pow(2).sum(dim=other)
    return total.sqrt()


def permute_embed(vit: nn.Module, order: Tensor) -> None:
    mats, vecs = _embed_writers_readers(vit)
    for w, dim in mats:
        _take(w, order, dim)
    for v in vecs:
        _take(v, order, 0)
    for tok in (vit.cls_token, vit.reg_token, vit.pos_embed):
        _take(tok, order, tok.dim() - 1 if tok is not None else 0)


@torch.no_grad()
def reorder_by_importance(vit: nn.Module) -> None:
    """Sort heads, MLP units (per block) and embedding channels by decreasing importance,
    in place. The full network computes the same function afterwards."""
    for blk in vit.blocks:
        permute_heads(blk, head_importance(blk).argsort(descending=True))
        permute_mlp(blk, mlp_importance(blk).argsort(descending=True))
    permute_embed(vit, embed_importance(vit).argsort(descending=True))
