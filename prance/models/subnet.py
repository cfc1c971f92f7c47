"""Sub-network configurations of the weight-sharing meta-network and the space they are
drawn from.

A :class:`SubNet` names, for every block, how many attention heads are active, how wide
the MLP hidden layer is and how wide the embedding (the residual stream) is. Every value
means "the first k channels" of the shared weights (after importance reordering, see
:mod:`prance.models.reorder`). The embedding width is set per *stage* by the space (as in
PRANCE, whose decisions are made per stage) but stored per block, so the execution
engine and the FLOPs counter need no notion of stages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from prance.errors import PranceError
from prance.models.arch import ArchSpec
from prance.stages import default_stage_starts


@dataclass(frozen=True)
class SubNet:
    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    embed: tuple[int, ...]

    @classmethod
    def full(cls, arch: ArchSpec) -> "SubNet":
        d = arch.depth
        return cls((arch.num_heads,) * d, (arch.mlp_hidden,) * d, (arch.embed_dim,) * d)

    def is_full(self, arch: ArchSpec) -> bool:
        return self == SubNet.full(arch)

    def check(self, arch: ArchSpec) -> "SubNet":
        """Raise :class:`PranceError` if this sub-network does not fit ``arch``."""
        for name, values, top in (
            ("heads", self.heads, arch.num_heads),
            ("mlp", self.mlp, arch.mlp_hidden),
            ("embed", self.embed, arch.embed_dim),
        ):
            if len(values) != arch.depth:
                raise PranceError(f"sub-network {name} has {len(values)} entries, the model has {arch.depth} blocks")
            bad = [v for v in values if not 1 <= v <= top]
            if bad:
                raise PranceError(f"sub-network {name} value {bad[0]} outside 1..{top}")
        return self

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SubNet":
        try:
            return cls(tuple(int(v) for v in d["heads"]), tuple(int(v) for v in d["mlp"]), tuple(int(v) for v in d["embed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PranceError(f"malformed sub-network {d!r}: needs integer lists heads, mlp, embed") from e


# Default width fractions of the wrapped model's heads, MLP hidden width and embedding.
DEFAULT_HEADS = (0.5, 0.75, 1.0)
DEFAULT_MLP = (0.5, 0.75, 1.0)
DEFAULT_EMBED = (0.75, 0.875, 1.0)


def _fractions_of(top: int, fractions: tuple[float, ...], multiple: int) -> tuple[int, ...]:
    vals = {max(multiple, int(top * f / multiple + 0.5) * multiple) for f in fractions}
    return tuple(sorted(min(v, top) for v in vals))


@dataclass(frozen=True)
class SubnetSpace:
    """Choices per block (heads, MLP width) and per stage (embedding width).

    The defaults keep 50-100% of heads and MLP width and 75-100% of the embedding
    width: PRANCE's DeiT-S space spans MLP ratios 2-5 around the trained 4 and embeddings
    within ~25% of the maximum; we cannot grow past the wrapped timm model, so the space
    extends downwards from it.
    """

    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    embed: tuple[int, ...]
    stage_starts: tuple[int, ...]
    depth: int = field(default=12)

    @classmethod
    def default(cls, arch: ArchSpec) -> "SubnetSpace":
        return cls.from_fractions(arch)

    @classmethod
    def from_fractions(
        cls,
        arch: ArchSpec,
        heads: tuple[float, ...] = DEFAULT_HEADS,
        mlp: tuple[float, ...] = DEFAULT_MLP,
        embed: tuple[float, ...] = DEFAULT_EMBED,
    ) -> "SubnetSpace":
        """The space whose choices are these fractions of the wrapped model's widths
        (heads rounded up, channel widths to multiples of 8 on models of >= 64 channels)."""
        mult = 8 if arch.embed_dim >= 64 else 1
        return cls(
            heads=tuple(sorted({max(1, math.ceil(arch.num_heads * f)) for f in heads})),
            mlp=_fractions_of(arch.mlp_hidden, tuple(mlp), mult),
            embed=_fractions_of(arch.embed_dim, tuple(embed), mult),
            stage_starts=default_stage_starts(arch.depth),
            depth=arch.depth,
        )

    def stage_of(self, block: int) -> int:
        return max(i for i, s in enumerate(self.stage_starts) if s <= block)

    def make(self, heads: list[int] | int, mlp: list[int] | int, embed_per_stage: list[int] | int) -> SubNet:
        d = self.depth
        heads = [heads] * d if isinstance(heads, int) else list(heads)
        mlp = [mlp] * d if isinstance(mlp, int) else list(mlp)
        n_st = len(self.stage_starts)
        embed_per_stage = [embed_per_stage] * n_st if isinstance(embed_per_stage, int) else list(embed_per_stage)
        embed = [embed_per_stage[self.stage_of(i)] for i in range(d)]
        return SubNet(tuple(heads), tuple(mlp), tuple(embed))

    def largest(self) -> SubNet:
        return self.make(self.heads[-1], self.mlp[-1], self.embed[-1])

    def smallest(self) -> SubNet:
        return self.make(self.heads[0], self.mlp[0], self.embed[0])

    def sample(self, generator: torch.Generator | None = None) -> SubNet:
        """A uniformly random sub-network: independent choices per block and per stage."""

        def pick(choices: tuple[int, ...], n: int) -> list[int]:
            idx = torch.randint(len(choices), (n,), generator=generator)
            return [choices[i] for i in idx.tolist()]

        return self.make(pick(self.heads, self.depth), pick(self.mlp, self.depth), pick(self.embed, len(self.stage_starts)))
