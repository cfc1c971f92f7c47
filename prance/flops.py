"""FLOPs of a sub-network under a token plan.

Convention (DeiT/ToMe/PPT tables): "FLOPs" are multiply-accumulates of matmul-type ops:
linear layers, the two attention matmuls, the patch-embedding conv, plus the
matmul-type work of the token strategies themselves (the class-attention row used for
ranking, ToMe's similarity matrix) -- PRANCE's released code leaves those out; we do not.
A hybrid ViT's fixed convolutional stem is counted once, by FlopCounterMode, when the
architecture is read (:func:`prance.models.arch.stem_macs`).
Element-wise ops, norms, softmax and sorting are not counted. DeiT-T/S/B at 224 give
1.26 / 4.61 / 17.58 GFLOPs.

The reference, :func:`measured_gflops`, runs a real forward under
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) and halves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prance.flop_reference import flop_counter, measured_gflops  # noqa: F401  (the reference counter, a leaf module)
from prance.models.arch import ArchSpec
from prance.models.subnet import SubNet
from prance.tokens.state import CLS_ATTN, TokenPlan


@dataclass(frozen=True)
class FlopsReport:
    macs: int  # per image
    token_ratio: float  # mean over blocks of tokens entering the block / tokens entering block 0
    final_token_ratio: float  # tokens entering the last block / tokens entering block 0

    @property
    def gflops(self) -> float:
        return self.macs / 1e9


def block_macs(n_in: int, n_mlp: int, width: int, heads: int, head_dim: int, hidden: int) -> int:
    """MACs of one dense block: ``n_in`` tokens through attention, ``n_mlp`` through the MLP."""
    a = heads * head_dim
    qkv = n_in * width * 3 * a
    attn = 2 * heads * n_in * n_in * head_dim
    proj = n_in * a * width
    mlp = 2 * n_mlp * width * hidden
    return qkv + attn + proj + mlp


def span_macs(arch: ArchSpec, subnet: SubNet, plan: TokenPlan, start: int, stop: int, n_in: int) -> tuple[int, list[int]]:
    """MACs per image of blocks ``start``..``stop-1`` entered by ``n_in`` tokens, and the
    token count entering each of them followed by the count leaving the last."""
    macs = 0
    counts = [n_in]
    n = n_in
    for i in range(start, stop):
        op = plan.ops[i]
        after = n if op is None else op.out_tokens(n)
        heads, hd = subnet.heads[i], arch.head_dim
        macs += block_macs(n, after, subnet.embed[i], heads, hd, subnet.mlp[i])
        if op is not None:
            if CLS_ATTN in op.needs:
                macs += heads * n * hd
            macs += op.extra_macs(n, hd)
        n = after
        counts.append(n)
    return macs, counts


def embed_macs(arch: ArchSpec, width: int) -> int:
    """The (hybrid) stem and the patch projection to ``width`` channels."""
    return arch.stem_macs + arch.num_patches * width * arch.patch_dim


def head_macs(arch: ArchSpec, width: int) -> int:
    return width * arch.num_classes


def count(arch: ArchSpec, subnet: SubNet | None = None, plan: TokenPlan | None = None) -> FlopsReport:
    """Analytic MACs per image of ``subnet`` (default: full) under ``plan`` (default: dense)."""
    subnet = subnet or SubNet.full(arch)
    plan = plan or TokenPlan.dense(arch.depth)
    n0 = arch.num_tokens
    blocks, _ = span_macs(arch, subnet, plan, 0, arch.depth, n0)
    macs = embed_macs(arch, subnet.embed[0]) + blocks + head_macs(arch, subnet.embed[-1])
    ratio, final = plan.token_ratios(n0)
    return FlopsReport(macs, ratio, final)


def gflops(arch: ArchSpec, subnet: SubNet | None = None, plan: TokenPlan | None = None) -> float:
    return count(arch, subnet, plan).gflops


