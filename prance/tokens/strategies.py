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

Every strategy is one :class:`StrategySpec` in :data:`REGISTRY`; the names the rest of
prance knows (the CLI's choices, the configs' allowed values, the sweep's ``free_*`` and
``static_*`` baselines, the selectors) are derived from it. A new strategy is its op
module plus one registry entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from prance.errors import PranceError
from prance.stages import default_stage_starts
from prance.tokens.merge import max_r, merge_keep_op, merge_op, tome_schedule
from prance.tokens.ppt import DEFAULT_R as PPT_R
from prance.tokens.ppt import DEFAULT_THRESHOLD, ppt_op
from prance.tokens.prune import prune_op
from prance.tokens.state import TokenOp, TokenPlan, chain

if TYPE_CHECKING:  # a plan is built for an architecture; no runtime import of models (models import tokens)
    from prance.models.arch import ArchSpec

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
    return REGISTRY[check_strategy(name)].default(arch)


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
    if REGISTRY[cfg.name].needs_class_token and not arch.has_class_token:
        raise PranceError(f"strategy {cfg.name!r} ranks tokens by class-token attention; this model has no class token")
    return tuple(locs), value


def _prune_merge_op(keep: float, num_prefix: int) -> TokenOp:
    """Prune to sqrt(keep) of the patches, then merge down to keep of them (each step
    removes about the same share; the merge is capped at half, so keep >= 0.25 merges
    fully)."""
    part = math.sqrt(keep)
    return chain("prune_merge", prune_op(part, num_prefix), merge_keep_op(part, num_prefix))


def build_plan(cfg: StrategyConfig, arch: ArchSpec) -> TokenPlan:
    """The token plan of ``cfg`` for ``arch``; :class:`PranceError` on bad parameters."""
    locs, value = _check(cfg, arch)
    spec = REGISTRY[cfg.name]
    ops = spec.ops(cfg, value, arch, locs) if spec.ops else [None] * arch.depth
    params = {} if spec.param is None else {spec.param: value}
    return TokenPlan(tuple(ops), prop_attn=cfg.prop_attn, name=cfg.name, params=params)


# ------------------------------------------------------------------------ the registry

Ops = list[TokenOp | None]


def _at_locs(make: Callable[[StrategyConfig, float | int, int], TokenOp]) -> Callable[..., Ops]:
    """Ops of a strategy that reduces at the reduction blocks only."""

    def ops(cfg: StrategyConfig, value, arch: ArchSpec, locs: tuple[int, ...]) -> Ops:
        out: Ops = [None] * arch.depth
        for i in locs:
            out[i] = make(cfg, value, arch.num_prefix_tokens)
        return out

    return ops


def _merge_ops(cfg: StrategyConfig, value: int, arch: ArchSpec, locs: tuple[int, ...]) -> Ops:
    p = arch.num_prefix_tokens
    return [merge_op(r, p) if r > 0 else None for r in tome_schedule(value, arch.depth, cfg.schedule)]


def _scaled(r_196: int) -> Callable[[ArchSpec], int]:
    return lambda arch: max(1, round(r_196 * arch.num_patches / 196))


def _selector_prune(keeps: tuple[float, ...], p: int) -> TokenOp:
    return prune_op(keeps[0], p)


def _selector_merge(keeps: tuple[float, ...], p: int) -> TokenOp:
    return merge_keep_op(keeps[0], p)


def _selector_prune_merge(keeps: tuple[float, ...], p: int) -> TokenOp:
    ops = [op for op, k in ((prune_op(keeps[0], p), keeps[0]), (merge_keep_op(keeps[1], p), keeps[1])) if k < 1.0]
    return ops[0] if len(ops) == 1 else chain("prune_merge", *ops)


@dataclass(frozen=True)
class StrategySpec:
    """Everything prance knows about one token strategy.

    ``param``: its strength parameter (``keep`` in (0, 1] or an integer ``r``), ``default``
    its value for an architecture, ``ops`` the per-block token ops of a validated config
    (None: dense). ``needs_class_token``: it ranks tokens by class-token attention.
    ``training_free``: the sweep offers it as ``free_<name>`` (full width, calibrated to the
    budget); ``static``: as ``static_<name>`` (the best static sub-network with it);
    ``selector_grids``: the keep-ratio grids a PRANCE selector chooses from per stage (one
    per token op of a decision; empty: no selector), ``selector_op`` the op for the chosen
    keeps (all >= 1 is handled by the caller as no reduction), ``spread_merge``: its last
    selector keep is a merge keep, which the selector's ``merge_spread`` spreads over the
    stage's blocks as ToMe does (any keep before it prunes at the stage's first block);
    ``sandwich_keep``: pretraining samples its strength as a keep ratio (else as r up to
    twice the default).
    """

    name: str
    param: str | None
    default: Callable[[ArchSpec], float | int | None]
    ops: Callable[..., Ops] | None
    needs_class_token: bool = False
    training_free: bool = True
    static: bool = True
    selector_grids: tuple[tuple[float, ...], ...] = ()
    selector_op: Callable[[tuple[float, ...], int], TokenOp] | None = None
    spread_merge: bool = False

    @property
    def sandwich_keep(self) -> bool:
        return self.param == "keep"


# Keep-ratio grids (share of the patch tokens entering the stage that survive its first
# block). ToMe merges at most half of the tokens per block, hence merge's floor of 0.5.
REGISTRY: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec("none", None, lambda arch: None, None, training_free=False, static=True),
    StrategySpec("prune", "keep", lambda arch: EVIT_KEEP, _at_locs(lambda cfg, v, p: prune_op(v, p, cfg.fuse)),
                 needs_class_token=True, selector_grids=((0.25, 0.4, 0.55, 0.7, 0.85, 1.0),), selector_op=_selector_prune),
    StrategySpec("merge", "r", _scaled(TOME_R), _merge_ops,
                 selector_grids=((0.5, 0.6, 0.7, 0.8, 0.9, 1.0),), selector_op=_selector_merge, spread_merge=True),
    StrategySpec("prune_merge", "keep", lambda arch: EVIT_KEEP, _at_locs(lambda cfg, v, p: _prune_merge_op(v, p)),
                 needs_class_token=True, selector_grids=((0.4, 0.55, 0.7, 0.85, 1.0), (0.5, 0.625, 0.75, 0.875, 1.0)),
                 selector_op=_selector_prune_merge, spread_merge=True),
    StrategySpec("ppt", "r", _scaled(PPT_R), _at_locs(lambda cfg, v, p: ppt_op(v, cfg.threshold, p)), needs_class_token=True),
)}

STRATEGIES = tuple(REGISTRY)
PARAM_OF = {name: spec.param for name, spec in REGISTRY.items()}
REDUCING_STRATEGIES = tuple(n for n in STRATEGIES if REGISTRY[n].ops is not None)  # all but none
SELECTOR_STRATEGIES = tuple(n for n, s in REGISTRY.items() if s.selector_grids)
TRAINING_FREE_STRATEGIES = tuple(n for n, s in REGISTRY.items() if s.training_free)

