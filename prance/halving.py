"""Successive halving (Jamieson & Talwalkar 2016): rank candidates by correct answers on a
growing prefix of the images -- all of them on the first ``first_images``, the best
``1/eta`` on ``eta`` times as many, and so on until one remains, which then sees every
image. The static search, the cascade's ladder and the selector's warm start rank with it;
:class:`Halving` is the one home of its settings, which the CLI, the sweep's ``static``
section and ``SelectorConfig`` take their defaults from. A leaf: plain Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Halving:
    """Successive halving's settings: every candidate on the first ``first_images``
    images, then the best ``1/eta`` on ``eta`` times as many, until one remains."""

    first_images: int = 64
    eta: int = 3

    @classmethod
    def of(cls, settings: dict) -> "Halving":
        """The settings in ``settings`` (a dict with ``first_images`` and ``eta``, each
        optional: a sweep's ``static`` section), the defaults for the rest."""
        return cls(**{k: settings[k] for k in ("first_images", "eta") if k in settings})


def successive_halving(
    n_candidates: int,
    n_images: int,
    correct_on: Callable[[int, int, int], int],
    halving: Halving = Halving(),
    *,
    tie_break: Callable[[int], float] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Rank candidates by correct answers on a growing prefix of the images.

    ``correct_on(c, start, stop)`` counts candidate ``c``'s correct answers on images
    ``start..stop-1``. Returns (order best first, correct counts, images seen) per
    candidate; the first of the order has seen all ``n_images``. Ties in accuracy go to
    the lower ``tie_break(c)`` (e.g. GFLOPs), then the lower index.
    """
    if n_candidates < 1 or n_images < 1:
        raise ValueError("successive halving needs candidates and images")
    eta = max(2, int(halving.eta))
    correct = [0] * n_candidates
    seen = [0] * n_candidates
    alive = list(range(n_candidates))
    stop = min(max(1, halving.first_images), n_images)

    def key(c: int):
        acc = correct[c] / seen[c] if seen[c] else 0.0
        return (-acc, tie_break(c) if tie_break else 0.0, c)

    while True:
        for c in alive:
            if seen[c] < stop:
                correct[c] += correct_on(c, seen[c], stop)
                seen[c] = stop
        if on_round is not None:
            on_round(len(alive), stop)
        alive.sort(key=key)
        if stop >= n_images:
            break
        alive = alive[: max(1, math.ceil(len(alive) / eta))]
        stop = n_images if len(alive) == 1 else min(n_images, stop * eta)
    survivors = set(alive)
    rest = sorted((c for c in range(n_candidates) if c not in survivors), key=lambda c: (-seen[c],) + key(c))
    return alive + rest, correct, seen
