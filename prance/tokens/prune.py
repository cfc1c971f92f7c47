"""Token pruning by class-token attention (EViT, Liang et al., ICLR 2022; PRANCE's prune).

Importance of a patch token is the class token's attention to it, averaged over heads.
The top ``ceil(keep * patches)`` patch tokens are kept (EViT's count) in their original
order; with ``fuse`` the dropped ones are fused into one extra token weighted by their
attention (EViT's "inattentive token fusion", raw attention weights as in EViT).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from prance.tokens.state import CLS_ATTN, TokenOp, TokenState, gather_tokens, keep_with_prefix


def kept_patches(n: int, keep: float, num_prefix: int) -> int:
    patches = n - num_prefix
    return min(patches, max(1, math.ceil(keep * patches))) if patches > 0 else 0


def keep_top(state: TokenState, scores: Tensor, k: int, by_score: bool = False) -> TokenState:
    """Keep the prefix and the ``k`` patch tokens with the highest ``scores`` (B, patches),
    in their original order, or with ``by_score`` in descending score order (PPT's
    reference code keeps them so, which changes the A/B split of a later ToMe pooling)."""
    if by_score:
        idx = scores.topk(k, dim=1, sorted=True).indices
    else:
        idx = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1)[0]
    return state.gather(keep_with_prefix(idx, state.num_prefix))


def prune_tokens(state: TokenState, keep: float, fuse: bool = False) -> TokenState:
    p = state.num_prefix
    n = state.x.shape[1]
    k = kept_patches(n, keep, p)
    if k >= n - p:
        return state
    scores = state.cls_attn.mean(dim=1)[:, p:]
    if not fuse:
        return keep_top(state, scores, k)
    order = scores.argsort(dim=1, descending=True)
    kept = state.gather(keep_with_prefix(order[:, :k].sort(dim=1)[0], p))
    dropped = order[:, k:]
    w = scores.gather(1, dropped).unsqueeze(-1)
    patches = state.x[:, p:]
    fused = (gather_tokens(patches, dropped) * w).sum(dim=1, keepdim=True)
    x = torch.cat([kept.x, fused], dim=1)
    size = kept.size
    if size is not None:
        size = torch.cat([size, gather_tokens(state.size[:, p:], dropped).sum(dim=1, keepdim=True)], dim=1)
    return TokenState(x, size, p, stats=state.stats)


def prune_rows(state: TokenState, n: Tensor, k: Tensor) -> TokenState:
    """Per-row pruning of a padded batch: row ``i`` holds ``n[i]`` tokens (the rest has
    size 0) and keeps its prefix and top ``k[i]`` patch tokens by class attention, in
    their original order, then padding of size 0 -- for every row what
    :func:`keep_top` gives that row alone (``n``, ``k``: (B,) on the state's device)."""
    p = state.num_prefix
    scores = state.cls_attn.mean(dim=1)[:, p:].float()
    patches = scores.shape[1]
    pos = torch.arange(patches, device=scores.device)
    scores = scores.masked_fill(pos[None, :] >= (n - p)[:, None], float("-inf"))  # padding: never kept
    top = int(k.max())
    idx = scores.topk(top, dim=1, sorted=True).indices  # each row's best first
    keep = torch.arange(top, device=idx.device)[None, :] < k[:, None]
    idx = torch.where(keep, idx, patches).sort(dim=1)[0]  # kept ones in their original order, then the rest
    valid = idx < patches
    kept = state.gather(keep_with_prefix(idx.clamp(max=patches - 1), p))
    size = kept.sizes().clone()
    size[:, p:] *= valid[..., None].to(size.dtype)
    return replace(kept, size=size)  # with the gathered attention facts (a merge may follow)


def prune_op(keep: float, num_prefix: int, fuse: bool = False) -> TokenOp:
    def out_tokens(n: int) -> int:
        k = kept_patches(n, keep, num_prefix)
        dropped = n - num_prefix - k
        return num_prefix + k + (1 if fuse and dropped > 0 else 0)

    return TokenOp(
        name="prune_fuse" if fuse else "prune",
        apply=lambda s: prune_tokens(s, keep, fuse),
        out_tokens=out_tokens,
        needs=frozenset({CLS_ATTN}),
    )
