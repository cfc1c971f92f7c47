"""The shared parts of every token strategy: the tokens in flight with their sizes,
the attention facts a strategy may read, and the per-block plan of token operations.

A token operation runs inside a block after the attention residual and before the MLP
(where ToMe, EViT, PPT and PRANCE all act). It is a pure function of a
:class:`TokenState` and declares which attention facts it needs, so the engine computes
only those. Every operation is *count-deterministic*: the number of tokens it leaves
depends only on the number it receives, which lets the FLOPs counter walk a plan
without running it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

# Attention facts an operation may ask for.
CLS_ATTN = "cls_attn"  # (B, heads, N) softmax row of the class token, with the size bias
METRIC = "metric"  # (B, N, head_dim) keys averaged over heads: ToMe's similarity metric
V_NORM = "v_norm"  # (B, N) L2 norm of each token's whole value vector (all heads concatenated)


@dataclass
class TokenState:
    """Tokens in flight between the attention and the MLP of one block."""

    x: Tensor  # (B, N, C)
    size: Tensor | None  # (B, N, 1) patches each token stands for; None means all ones
    num_prefix: int  # class/register tokens at the front, never removed
    cls_attn: Tensor | None = None
    metric: Tensor | None = None
    v_norm: Tensor | None = None
    stats: dict | None = None  # optional sink for diagnostics (e.g. PPT's per-image choice)

    def sizes(self) -> Tensor:
        """Sizes, materialised as ones when nothing was merged yet."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1)

    def gather(self, idx: Tensor) -> "TokenState":
        """Keep tokens ``idx`` (B, K) of every per-token tensor, in that order."""
        return replace(
            self,
            x=gather_tokens(self.x, idx),
            size=None if self.size is None else gather_tokens(self.size, idx),
            cls_attn=None if self.cls_attn is None else gather_tokens(self.cls_attn, idx, dim=2),
            metric=None if self.metric is None else gather_tokens(self.metric, idx),
            v_norm=None if self.v_norm is None else gather_tokens(self.v_norm, idx),
        )

    def record(self, key: str, value: Tensor) -> None:
        if self.stats is not None:
            self.stats.setdefault(key, []).append(value.detach())


def gather_tokens(t: Tensor, idx: Tensor, dim: int = 1) -> Tensor:
    """``t`` gathered along its token axis ``dim`` with per-row indices ``idx`` (B, K)."""
    shape = list(t.shape)
    view = [idx.shape[0]] + [1] * (t.dim() - 1)
    view[dim] = idx.shape[1]
    index = idx.reshape(view)
    shape[dim] = idx.shape[1]
    return t.gather(dim, index.expand(shape))


def keep_with_prefix(keep_patch_idx: Tensor, num_prefix: int) -> Tensor:
    """Indices of the prefix tokens followed by ``keep_patch_idx`` (indices among patches)."""
    b = keep_patch_idx.shape[0]
    prefix = torch.arange(num_prefix, device=keep_patch_idx.device).expand(b, num_prefix)
    return torch.cat([prefix, keep_patch_idx + num_prefix], dim=1)


@dataclass(frozen=True)
class TokenOp:
    """One count-deterministic token operation.

    ``out_tokens(n)`` is the token count it leaves from ``n``; ``extra_macs(n, head_dim)``
    the multiply-accumulates of its own matmul-type work (e.g. ToMe's similarity
    matrix), per image. The cost of the attention facts in ``needs`` is counted by the
    FLOPs counter from ``needs``.
    """

    name: str
    apply: Callable[[TokenState], TokenState]
    out_tokens: Callable[[int], int]
    extra_macs: Callable[[int, int], int] = lambda n, head_dim: 0
    needs: frozenset[str] = frozenset()
    parts: tuple["TokenOp", ...] = ()  # a chain's operations, in order


def chain(name: str, *ops: TokenOp) -> TokenOp:
    """Run ``ops`` one after the other inside the same block."""

    def apply(state: TokenState) -> TokenState:
        for op in ops:
            state = op.apply(state)
        return state

    def out_tokens(n: int) -> int:
        for op in ops:
            n = op.out_tokens(n)
        return n

    def extra_macs(n: int, head_dim: int) -> int:
        total = 0
        for op in ops:
            total += op.extra_macs(n, head_dim)
            n = op.out_tokens(n)
        return total

    return TokenOp(name, apply, out_tokens, extra_macs, frozenset().union(*(op.needs for op in ops)), parts=tuple(ops))


@dataclass(frozen=True)
class TokenPlan:
    """What happens to the tokens in each block of one forward pass.

    ``ops[i]`` runs in block ``i`` (None: nothing). ``prop_attn`` adds log(size) to the
    attention logits once tokens have been merged (ToMe's proportional attention).
    ``params`` records the strategy's parameters for reports.
    """

    ops: tuple[TokenOp | None, ...]
    prop_attn: bool = True
    name: str = "none"
    params: dict = field(default_factory=dict)

    @classmethod
    def dense(cls, depth: int) -> "TokenPlan":
        return cls((None,) * depth)

    def token_counts(self, n0: int) -> list[tuple[int, int]]:
        """(tokens entering the block, tokens entering its MLP) for every block."""
        counts = []
        n = n0
        for op in self.ops:
            after = n if op is None else op.out_tokens(n)
            counts.append((n, after))
            n = after
        return counts

    def token_ratios(self, n0: int) -> tuple[float, float]:
        """(mean over blocks of tokens entering the block / n0, last block's / n0)."""
        entering = [n for n, _ in self.token_counts(n0)]
        return sum(entering) / (len(entering) * n0), entering[-1] / n0
