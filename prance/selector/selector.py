"""A trained selector: its networks, action space and cost table, bound to the
meta-network it was trained on; and adaptive evaluation (Top-1, GFLOPs with the
selector's own cost, token ratios, measured throughput)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from prance.budget import spread
from prance.device import of as device_of, synchronize
from prance.errors import PranceError
from prance.models.meta import MetaViT
from prance.selector import execute
from prance.selector.actions import ActionSpace, CostTable
from prance.selector.features import obs_dim, stage_slice
from prance.selector.policy import ActorCritic
from prance.tokens.strategies import StrategyConfig


def meta_fingerprint(meta: MetaViT) -> str:
    """sha256 of the meta-network's weights (float32, sorted names) and architecture."""
    h = hashlib.sha256(repr(meta.arch).encode() + repr(meta.space).encode())
    for name, t in sorted(meta.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Selector:
    policy: ActorCritic
    actions: ActionSpace
    table: CostTable
    fingerprint: str  # of the meta-network it belongs to
    budget_kind: str = "cap"  # cap: each image's actions masked to its budget; mean: only to the full sub-network

    @classmethod
    def create(
        cls, meta: MetaViT, strategy: str, decision_blocks, *, hidden: int = 128, seed: int = 0, joint_widths: bool = True,
        fingerprint: str | None = None, merge_spread: bool = False, anchor: StrategyConfig | None = None, budget_kind: str = "cap",
    ) -> "Selector":
        actions = ActionSpace(meta.arch, meta.space, strategy, decision_blocks, joint_widths=joint_widths, merge_spread=merge_spread,
                              anchor=anchor)
        torch.manual_seed(seed)
        e, n_st = meta.arch.embed_dim, actions.num_stages
        policy = ActorCritic(obs_dim(e, n_st), actions.sizes, hidden, stage_slice(e, n_st))
        return cls(policy, actions, CostTable(actions), fingerprint or meta_fingerprint(meta), budget_kind)

    @classmethod
    def for_config(cls, meta: MetaViT, cfg, anchor: StrategyConfig | None = None, fingerprint: str | None = None) -> "Selector":
        """A fresh selector as a :class:`prance.selector.config.SelectorConfig` describes it
        (``anchor``: see :class:`prance.selector.actions.ActionSpace`)."""
        return cls.create(meta, cfg.strategy, cfg.decision_blocks, hidden=cfg.hidden, seed=cfg.seed, joint_widths=cfg.joint_widths,
                          fingerprint=fingerprint, merge_spread=cfg.merge_spread, anchor=anchor, budget_kind=cfg.budget_kind)

    @property
    def overhead_macs(self) -> int:
        return self.policy.actor_macs() * self.actions.num_stages

    def min_gflops(self) -> float:
        """The least GFLOPs per image any schedule reaches (selector included)."""
        return (self.table.min_macs + self.overhead_macs) / 1e9

    def full_gflops(self) -> float:
        return self.table.full_macs / 1e9

    def check_budget(self, budget_gflops: float) -> float:
        lo = self.min_gflops()
        if budget_gflops < lo:
            raise PranceError(
                f"budget {budget_gflops:.4g} GFLOPs is below the smallest this meta-network reaches with "
                f"strategy {self.actions.strategy!r} ({lo:.4g} GFLOPs, {100 * lo / self.full_gflops():.1f}% of the full sub-network)"
            )
        return budget_gflops

    def run_episode(self, meta: MetaViT, images: Tensor, budget_gflops: float | Tensor, *, greedy: bool = True, generator=None,
                    rtg: bool = False, amp: bool = False) -> execute.Episode:
        """One episode per image of ``images`` (on the meta-network's device); see :func:`execute.run_episode`."""
        b = images.shape[0]
        budget = torch.as_tensor(budget_gflops, dtype=torch.float64) * 1e9
        budget = budget.expand(b) if budget.dim() == 0 else budget
        # a mean budget caps no image below the full sub-network (its policy and all)
        cap = budget if self.budget_kind == "cap" else torch.full((b,), float(self.table.full_macs + self.overhead_macs), dtype=torch.float64)
        return execute.run_episode(meta, self.actions, self.table, self.policy, images, budget, greedy=greedy, generator=generator,
                                   rtg=rtg, amp=amp, cap_macs=cap)


@torch.inference_mode()
def evaluate_selector(
    meta: MetaViT,
    selector: Selector,
    batches: Iterable[tuple[Tensor, Tensor]],
    budget_gflops: float,
    *,
    progress: bool = True,
    reward_fn: Callable[[Tensor, Tensor, execute.Episode], Tensor] | None = None,
    amp: bool = False,
) -> dict:
    """Top-1 (%), GFLOPs per image (selector included: mean, p95, max), token ratios, images/s of
    the adaptive forward (data loading excluded), the mean distinct schedules per batch
    and, with ``reward_fn(x, y, episode)``, the mean reward (computed outside the timing).
    Runs on the meta-network's device; ``amp``: its forwards in mixed precision."""
    meta.eval()
    dev = device_of(meta)
    correct = n = 0
    tok = final = 0.0
    per_image: list[Tensor] = []
    seconds = 0.0
    groups = []
    rewards = 0.0
    for x, y in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False, delay=2):
        x = x.to(dev, non_blocking=True)
        synchronize(dev)
        t0 = time.perf_counter()
        ep = selector.run_episode(meta, x, budget_gflops, amp=amp)
        synchronize(dev)
        seconds += time.perf_counter() - t0
        correct += int((ep.logits.argmax(dim=-1) == y).sum())
        n += len(y)
        per_image.append(ep.macs.double().cpu() / 1e9)
        tok += float(ep.token_ratio.sum())
        final += float(ep.final_token_ratio.sum())
        groups.append(ep.groups)
        if reward_fn is not None:
            rewards += float(reward_fn(x, y, ep).sum())
    if n == 0:
        raise PranceError("no images to evaluate")
    return {
        "top1": 100.0 * correct / n,
        **spread(torch.cat(per_image).tolist()),  # gflops (mean), gflops_p95, gflops_max
        "token_ratio": tok / n,
        "final_token_ratio": final / n,
        "throughput_img_s": n / seconds,
        "n_images": n,
        "budget_gflops": budget_gflops,
        "schedules_per_batch": sum(groups) / len(groups),
        **({"reward": rewards / n} if reward_fn is not None else {}),
    }
