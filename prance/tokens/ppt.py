"""PPT: adaptive token pruning & pooling (Wu et al., arXiv 2310.01812).

Per image and per layer: the significance score of a patch token (from ATS) is the class
token's attention to it summed over heads, times the L2 norm of its whole value vector
(all heads concatenated), normalised over the patch tokens. When the variance of the scores is below ``threshold`` the tokens
are about equally important and duplicative redundancy dominates: *pool* (ToMe's
bipartite matching with size-weighted average). Otherwise inattentive redundancy
dominates: *prune* the r lowest-scoring tokens (the kept ones in descending score order,
as PPT's code leaves them). Both branches remove exactly r tokens,
so the token count (and FLOPs) do not depend on the image.

Batched with no loop over images: the batch is split once by the boolean rule into a
pooling and a pruning sub-batch, each processed densely, and written back in place.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from prance.tokens.merge import matching_macs, max_r, merge_tokens
from prance.tokens.prune import keep_top
from prance.tokens.state import CLS_ATTN, METRIC, V_NORM, TokenOp, TokenState

DEFAULT_R = 50  # per reduction layer, for 196 patches (DeiT at 224)
DEFAULT_THRESHOLD = 7e-5  # off-the-shelf models (PPT uses 6e-5 after fine-tuning)


def significance(state: TokenState) -> Tensor:
    """(B, patches) normalised significance scores: ATS's and PPT's
    ``(sum over heads of the class token's attention) * ||v||``, with ``||v||`` the norm of
    the token's whole value vector (all heads concatenated, one norm per token)."""
    p = state.num_prefix
    s = state.cls_attn[:, :, p:].sum(dim=1) * state.v_norm[:, p:]
    return s / s.sum(dim=-1, keepdim=True)


def _subset(state: TokenState, mask: Tensor) -> TokenState:
    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[mask]

    return replace(
        state,
        x=state.x[mask],
        size=pick(state.size),
        cls_attn=pick(state.cls_attn),
        metric=pick(state.metric),
        v_norm=pick(state.v_norm),
    )


def ppt_tokens(state: TokenState, r: int, threshold: float) -> TokenState:
    p = state.num_prefix
    n = state.x.shape[1]
    r = min(r, max_r(n, p))
    if r <= 0:
        return state
    scores = significance(state)
    pool = scores.var(dim=-1) < threshold
    state.record("ppt_pool", pool)
    k = n - p - r

    def prune(s: TokenState, sc: Tensor) -> TokenState:
        return keep_top(s, sc, k, by_score=True)

    if bool(pool.all()):
        return merge_tokens(state, r)
    if not bool(pool.any()):
        return prune(state, scores)
    state = replace(state, size=state.sizes())  # pooled images create sizes: track them for all
    pooled = merge_tokens(_subset(state, pool), r)
    pruned = prune(_subset(state, ~pool), scores[~pool])
    x = state.x.new_empty(state.x.shape[0], n - r, state.x.shape[2])
    size = state.size.new_empty(state.x.shape[0], n - r, 1)
    x[pool], size[pool] = pooled.x, pooled.size
    x[~pool], size[~pool] = pruned.x, pruned.size
    return TokenState(x, size, p, stats=state.stats)


def ppt_op(r: int, threshold: float, num_prefix: int) -> TokenOp:
    """PPT in one block. Its own FLOPs are counted as if every image pooled (the
    similarity matrix is the only matmul-type cost; an upper bound, < 0.1% of a block)."""

    def out_tokens(n: int) -> int:
        return n - min(r, max_r(n, num_prefix))

    return TokenOp(
        name="ppt",
        apply=lambda s: ppt_tokens(s, r, threshold),
        out_tokens=out_tokens,
        extra_macs=lambda n, hd: matching_macs(n, hd) if min(r, max_r(n, num_prefix)) > 0 else 0,
        needs=frozenset({CLS_ATTN, V_NORM, METRIC}),
    )
