"""ToMe token merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Bipartite soft matching exactly as ToMe defines it: the keys averaged over heads are the
similarity metric; tokens are split alternately into sets A (even positions) and B (odd
positions); each A token is matched to its most cosine-similar B token; the r most
similar edges are merged by a size-weighted average into their B token; the class token
is never merged; at most half of the non-prefix tokens go per application.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from prance.tokens.state import METRIC, TokenOp, TokenState

Merge = Callable[[Tensor, str], Tensor]


def max_r(n: int, num_prefix: int) -> int:
    """Most tokens one bipartite matching can remove from ``n`` tokens."""
    return max(0, (n - num_prefix) // 2)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 1) -> Merge:
    """Plan a merge of ``r`` tokens from ``metric`` (B, N, d); return ``merge(x, mode)``
    that applies it to any (B, N, C) tensor, reducing with ``mode`` ("sum", "mean", ...).

    Prefix tokens sit at the front: the even ones fall in A and are never sources, the odd
    ones fall in B and are never destinations. The output keeps the prefix tokens first
    (for a single class token the output order is exactly ToMe's: sorted unmerged A
    tokens, then B).
    """
    n = metric.shape[1]
    r = min(r, max_r(n, num_prefix))
    if r <= 0:
        return lambda x, mode="mean": x
    pre_a, pre_b = (num_prefix + 1) // 2, num_prefix // 2
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if pre_a:
            scores[:, :pre_a, :] = -math.inf
        if pre_b:
            scores[:, :, :pre_b] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
        if num_prefix:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        bsz, n_a, c = src.shape
        unm = src.gather(1, unm_idx.expand(bsz, n_a - r, c))
        src = src.gather(1, src_idx.expand(bsz, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(bsz, r, c), src, reduce=mode)
        if pre_b:
            return torch.cat([unm[:, :pre_a], dst[:, :pre_b], unm[:, pre_a:], dst[:, pre_b:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: a merged token is the mean of the patches it holds."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def merge_tokens(state: TokenState, r: int) -> TokenState:
    """Merge ``r`` tokens of ``state`` by ToMe's matching on ``state.metric``."""
    merge = bipartite_soft_matching(state.metric, r, state.num_prefix)
    x, size = merge_wavg(merge, state.x, state.sizes())
    return TokenState(x, size, state.num_prefix, stats=state.stats)


def merge_rows(state: TokenState, n: Tensor, r: Tensor) -> TokenState:
    """Per-row ToMe on a padded batch: row ``i`` holds ``n[i]`` tokens (the rest has size
    0) and merges ``r[i]`` of them -- for every row what :func:`merge_tokens` gives that
    row alone, in the same token order, then padding of size 0 (``n``, ``r``: (B,) on the
    state's device; at most one prefix token)."""
    p = state.num_prefix
    if p > 1:
        raise ValueError("merge_rows supports at most one prefix token")
    x, size = state.x, state.sizes()
    bsz, tokens, c = x.shape
    r = torch.minimum(r, ((n - p) // 2).clamp_min(0))
    real = torch.arange(tokens, device=x.device)[None, :] < n[:, None]
    real_a, real_b = real[:, ::2], real[:, 1::2]
    n_a = real_a.shape[1]
    with torch.no_grad():
        metric = state.metric / state.metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(state.metric.dtype).tiny)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        scores = scores.masked_fill(~real_b[:, None, :], -math.inf)
        if p:
            scores[:, :1, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        node_max = node_max.masked_fill(~real_a, -math.inf)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        rank = torch.empty_like(edge_idx).scatter_(1, edge_idx, torch.arange(n_a, device=x.device).expand(bsz, n_a))
        src = rank < r[:, None]  # the merged A tokens
        # the order merge_tokens leaves: unmerged A tokens (by position with a class token,
        # by rank without), then every B token; padding and merged tokens last
        key_a = torch.arange(n_a, device=x.device).expand(bsz, n_a) if p else rank
        key_b = n_a + torch.arange(real_b.shape[1], device=x.device).expand(bsz, -1)
        key = torch.cat([key_a.masked_fill(src | ~real_a, 2 * tokens), key_b.masked_fill(~real_b, 2 * tokens)], dim=1)
        # a row that merges nothing keeps its tokens where they are (merge_tokens returns it as it is)
        as_is = torch.cat([torch.arange(0, tokens, 2, device=x.device), torch.arange(1, tokens, 2, device=x.device)])
        key = torch.where((r == 0)[:, None], as_is.expand(bsz, -1).masked_fill(~torch.cat([real_a, real_b], dim=1), 2 * tokens), key)
        order = key.argsort(dim=1)[:, : int((n - r).max())]
        keep = key.gather(1, order) < 2 * tokens
    weighted, moved = x * size, src[..., None]
    dst = weighted[:, 1::2].scatter_add(1, node_idx[..., None].expand(-1, -1, c), weighted[:, ::2] * moved)
    dst_size = size[:, 1::2].scatter_add(1, node_idx[..., None], size[:, ::2] * moved)
    x_out = torch.cat([weighted[:, ::2], dst], dim=1).gather(1, order[..., None].expand(-1, -1, c))
    size_out = torch.cat([size[:, ::2], dst_size], dim=1).gather(1, order[..., None]) * keep[..., None]
    x_out = torch.where(size_out > 0, x_out / size_out.clamp_min(torch.finfo(size_out.dtype).tiny), 0.0)
    return TokenState(x_out, size_out, p, stats=state.stats)


def matching_macs(n: int, head_dim: int) -> int:
    """Multiply-accumulates of the A x B similarity matrix for ``n`` tokens."""
    return math.ceil(n / 2) * (n // 2) * head_dim


def merge_op(r: int | Callable[[int], int], num_prefix: int) -> TokenOp:
    """Merge ``r`` tokens (or ``r(n)`` of ``n``), capped at half the non-prefix tokens."""
    r_of = r if callable(r) else (lambda n: r)

    def eff(n: int) -> int:
        return max(0, min(r_of(n), max_r(n, num_prefix)))

    return TokenOp(
        name="merge",
        apply=lambda s: merge_tokens(s, eff(s.x.shape[1])),
        out_tokens=lambda n: n - eff(n),
        extra_macs=lambda n, hd: matching_macs(n, hd) if eff(n) > 0 else 0,
        needs=frozenset({METRIC}),
    )


def merge_keep_op(keep: float, num_prefix: int) -> TokenOp:
    """ToMe merging down to ``keep`` of the patch tokens (at most half per block)."""

    def r(n: int) -> int:
        patches = n - num_prefix
        return max(0, patches - max(1, math.ceil(keep * patches)))

    return merge_op(r, num_prefix)


def tome_schedule(r: int, depth: int, schedule: str = "constant") -> list[int]:
    """r per block: ToMe's constant schedule, or its decreasing one (inflection -1:
    linearly from 2r in the first block to 0 in the last, same total)."""
    if schedule == "constant":
        return [r] * depth
    if schedule == "decreasing":
        if depth == 1:
            return [r]
        step = -2 * r / (depth - 1)
        return [int(2 * r + step * i) for i in range(depth)]
    raise ValueError(f"unknown ToMe schedule {schedule!r}")
