"""The token strategies by name, their parameters, and the plans they build.

| name          | parameter | where                         | what                                         |
|---------------|-----------|-------------------------------|----------------------------------------------|
| `none`        | -         | -                             | dense                                        |
| `prune`       | `keep`    | reduction blocks (3, 6, 9)    | keep top-k by CLS attention (EViT/PRANCE)    |
| `merge`       | `r`       | every block                   | ToMe bipartite soft matching, r per block    |
| `prune_merge` | `keep`    | reduction blocks              | prune to sqrt(keep), then ToMe-merge to keep |
| `ppt`         | `r`       | reduction blocks              | PPT: pool or prune r tokens per image        |

The reduction blocks default to the quarter points of the depth, (3, 6, 9) for 12 blocks,
where PRANCE, EViT and PPT reduce. Defaults: EViT's keep 0.7; ToMe's r = 13 and PPT's
r = 50 for 196 patches, scaled by the patch count for other models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prance.errors import PranceError
from prance.models.arch import ArchSpec
from prance.models.subnet import default_stage_starts
from prance.tokens.merge import max_r, merge_op, tome_schedule
from prance.tokens.ppt import DEFAULT_R as PPT_R
from prance.tokens.ppt import DEFAULT_THRESHOLD, ppt_op
from prance.tokens.prune import prune_op
from prance.tokens.state import TokenOp, TokenPlan, chain

STRATEGIES = ("none", "prune", "merge", "prune_merge", "ppt")
PARAM_OF = {"none": None, "prune": "keep", "merge": "r", "prune_merge": "keep", "ppt": "r"}
TOME_R = 13  # ToMe's DeiT-S setting, for 196 patches
EVIT_KEEP = 0.7


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise PranceError(f"unknown token strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    return name


def default_locs(depth: int) -> tuple[int, ...]:
    return default_stage_starts(depth)[1:]


def r_range(name: str, arch: ArchSpec) -> tuple[int, int]:
    """Valid r for ``merge`` / ``ppt``: beyond the upper end nothing more can be merged."""
    return 0, max_r(arch.num_tokens, arch.num_prefix_tokens)


def default_param(name: str, arch: ArchSpec) -> float | int | None:
    scale = arch.num_patches / 196
    return {
        "none": None,
        "prune": EVIT_KEEP,
        "prune_merge": EVIT_KEEP,
        "merge": max(1, round(TOME_R * scale)),
        "ppt": max(1, round(PPT_R * scale)),
    }[name]


@dataclass(frozen=True)
class StrategyConfig:
    """A strategy with its parameters (None: the strategy's default)."""

    name: str = "none"
    r: int | None = None
    keep: float | None = None
    locs: tuple[int, ...] | None = None
    schedule: str = "constant"  # ToMe's r schedule: constant | decreasing
    threshold: float = DEFAULT_THRESHOLD  # PPT
    fuse: bool = False  # EViT fusion of pruned tokens
    prop_attn: bool = True

    def with_param(self, value: float | int) -> "StrategyConfig":
        param = PARAM_OF[self.name]
        return StrategyConfig(**{**self.__dict__, param: value})

    @property
    def param_value(self) -> float | int | None:
        param = PARAM_OF[self.name]
        return None if param is None else getattr(self, param)


def _check(cfg: StrategyConfig, arch: ArchSpec) -> tuple[tuple[int, ...], float | int | None]:
    check_strategy(cfg.name)
    param = PARAM_OF[cfg.name]
    other = {"keep": "r", "r": "keep"}.get(param)
    if param is None and (cfg.r is not None or cfg.keep is not None):
        raise PranceError("strategy 'none' takes no --r or --keep")
    if other and getattr(cfg, other) is not None:
        raise PranceError(f"strategy {cfg.name!r} takes --{param}, not --{other}")
    value = cfg.param_value
    if value is None:
        value = default_param(cfg.name, arch)
    if param == "keep" and not (0 < value <= 1):
        raise PranceError(f"keep must be in (0, 1], got {value}")
    if param == "r":
        lo, hi = r_range(cfg.name, arch)
        if value != int(value) or not lo <= value <= hi:
            raise PranceError(f"r must be an integer in {lo}..{hi} for this model, got {value}")
        value = int(value)
    locs = cfg.locs if cfg.locs is not None else default_locs(arch.depth)
    if any(not 0 <= i < arch.depth for i in locs):
        raise PranceError(f"reduction blocks {list(locs)} outside 0..{arch.depth - 1}")
    if len(set(locs)) != len(locs):
        raise PranceError(f"reduction blocks {list(locs)} name a block twice")
    if not (math.isfinite(cfg.threshold) and cfg.threshold >= 0):
        raise PranceError(f"PPT's variance threshold must be a finite number >= 0, got {cfg.threshold}")
    if cfg.schedule not in ("constant", "decreasing"):
        raise PranceError(f"unknown ToMe schedule {cfg.schedule!r}: constant or decreasing")
    if cfg.name in ("prune", "prune_merge", "ppt") and not arch.has_class_token:
        raise PranceError(f"strategy {cfg.name!r} ranks tokens by class-token attention; this model has no class token")
    return tuple(locs), value


def _prune_merge_op(keep: float, num_prefix: int) -> TokenOp:
    """Prune to sqrt(keep) of the patches, then merge down to keep of them (each step
    removes about the same share; the merge is capped at half, so keep >= 0.25 merges
    fully)."""
    part = math.sqrt(keep)

    def merge_r(n: int) -> int:
        patches = n - num_prefix
        return max(0, patches - max(1, math.ceil(part * patches)))

    return chain("prune_merge", prune_op(part, num_prefix), merge_op(merge_r, num_prefix))


def build_plan(cfg: StrategyConfig, arch: ArchSpec) -> TokenPlan:
    """The token plan of ``cfg`` for ``arch``; :class:`PranceError` on bad parameters."""
    locs, value = _check(cfg, arch)
    p = arch.num_prefix_tokens
    ops: list[TokenOp | None] = [None] * arch.depth
    if cfg.name == "merge":
        ops = [merge_op(r, p) if r > 0 else None for r in tome_schedule(value, arch.depth, cfg.schedule)]
    elif cfg.name == "prune":
        for i in locs:
            ops[i] = prune_op(value, p, cfg.fuse)
    elif cfg.name == "prune_merge":
        for i in locs:
            ops[i] = _prune_merge_op(value, p)
    elif cfg.name == "ppt":
        for i in locs:
            ops[i] = ppt_op(value, cfg.threshold, p)
    params = {} if PARAM_OF[cfg.name] is None else {PARAM_OF[cfg.name]: value}
    return TokenPlan(tuple(ops), prop_attn=cfg.prop_attn, name=cfg.name, params=params)
