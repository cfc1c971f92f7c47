"""Per-input adaptive execution of the meta-network under a selector, batched by
grouping.

At each decision point the policy runs once on the features of every image in the batch
and picks a decision per image. Images with the same decision that entered the stage
together (same tokens count, same earlier decisions) form a group and run the stage as
one dense sub-batch; groups split further at later decisions and their logits are
scattered back into batch order at the end. No loop over single images, no averaging of
decisions over the batch: an image's result does not depend on its batch-mates.

Devices: the meta-network runs where ``images`` are (with ``amp``, under mixed
precision); the policy, the budget masks and the bookkeeping stay on the CPU -- the
policy is a ~45K-parameter MLP called once per stage, and sampling it with a CPU
generator gives the same decisions on every device.

With ``rtg=True`` (training) it also runs, after every decision but the last, the
Result-to-Go *completion*: the rest of the network with that decision's channels and no
further token reduction, giving the logits and MACs the reward of that step needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prance.device import autocast_for
from prance.models import engine
from prance.models.meta import MetaViT
from prance.selector.actions import ActionSpace, CostTable, StageDecision
from prance.selector.features import observe
from prance.selector.policy import ActorCritic
from prance.tokens.state import TokenState


@dataclass
class Group:
    idx: Tensor  # positions in the batch
    state: TokenState

@dataclass
class Episode:
    logits: Tensor  # (B, classes)
    macs: Tensor  # (B,) float64, the selector's own cost included
    token_ratio: Tensor  # (B,)
    final_token_ratio: Tensor  # (B,)
    actions: Tensor  # (B, S, dims)
    obs: Tensor | None = None  # (B, S, obs_dim)
    masks: list[Tensor] | None = None  # per dim (B, S, size)
    logp: Tensor | None = None  # (B, S)
    # Result-to-Go completions after each decision (index S-1 is the episode's own result)
    cont_logits: Tensor | None = None  # (B, S, classes)
    cont_macs: Tensor | None = None  # (B, S)
    cont_token_ratio: Tensor | None = None  # (B, S)
    groups: int = 0  # leaf groups that ran (distinct per-image schedules in the batch)


def _partition(keys: Tensor) -> list[Tensor]:
    """Positions of each distinct row of ``keys`` (N, k)."""
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    order = inverse.argsort(stable=True)
    counts = torch.bincount(inverse).tolist()
    return list(order.split(counts))


def _concat(parts: list[tuple[Group, Tensor]], width: int, num_prefix: int) -> Group:
    """One group of the ``rows`` of several groups (same token count), at ``width``."""
    xs, sizes, idx = [], [], []
    merged = any(g.state.size is not None for g, _ in parts)
    for g, rows in parts:
        rows = rows.to(g.state.x.device)
        xs.append(engine.resize_width(g.state.x[rows], width))
        if merged:
            sizes.append(g.state.sizes()[rows])
        idx.append(g.idx[rows])
    return Group(torch.cat(idx), TokenState(torch.cat(xs), torch.cat(sizes) if merged else None, num_prefix))


def _run_blocks(vit, state: TokenState, start: int, stop: int, dec: StageDecision, ops, counts: Tensor | None = None, idx: Tensor | None = None) -> TokenState:
    """Blocks ``start``..``stop-1`` with ``dec``'s widths and ``ops`` (one per block);
    with ``counts`` (B, depth), the tokens entering each block go to rows ``idx``."""
    for i in range(start, stop):
        if counts is not None:
            counts[idx, i] = state.x.shape[1]
        state = engine.block(vit.blocks[i], state, dec.heads, dec.mlp, dec.embed, ops[i - start], True)
    return state


@torch.no_grad()
def run(
    meta: MetaViT,
    actions: ActionSpace,
    table: CostTable,
    policy: ActorCritic,
    images: Tensor,
    budget_macs: Tensor,
    greedy: bool = True,
    generator: torch.Generator | None = None,
    rtg: bool = False,
    amp: bool = False,
) -> Episode:
    """Run ``images`` adaptively with a per-image MACs budget ``budget_macs`` (B,) on
    ``images``' device (the meta-network must be there); the episode's tensors are on
    the CPU."""
    arch = meta.arch
    vit = meta.vit
    b = images.shape[0]
    S = actions.num_stages
    n0, D = arch.num_tokens, arch.embed_dim
    overhead = float(policy.actor_macs() * S)
    budget_frac = budget_macs.double() / table.full_macs
    fixed = tuple(actions.fixed_index(d) for d in range(len(actions.dims)))
    exact_slice = isinstance(vit.norm_pre, torch.nn.Identity) and isinstance(getattr(vit.patch_embed, "norm", torch.nn.Identity()), torch.nn.Identity)

    dev = images.device
    budget_macs = budget_macs.cpu()

    def net():  # the meta-network's own computation: on the device, mixed precision with amp
        return autocast_for(dev, amp)

    with net():
        x = engine.embed(vit, images, D)
    p = arch.num_prefix_tokens
    groups = [Group(torch.arange(b), TokenState(x, None, p))]
    spent = torch.zeros(b, dtype=torch.float64)
    counts = torch.zeros(b, arch.depth, dtype=torch.long)  # tokens entering each block
    all_actions = torch.zeros(b, S, len(actions.dims), dtype=torch.long)
    obs_all = torch.zeros(b, S, policy.obs_dim) if rtg else None
    masks_all = [torch.zeros(b, S, s, dtype=torch.bool) for s in actions.sizes] if rtg else None
    logp_all = torch.zeros(b, S) if rtg else None
    classes = arch.num_classes
    cont_logits = torch.zeros(b, S, classes) if rtg else None
    cont_macs = torch.zeros(b, S, dtype=torch.float64) if rtg else None
    cont_tokens = torch.zeros(b, S) if rtg else None
    logits = torch.zeros(b, classes)
    channels = torch.arange(actions.num_width_dims)  # the width dimensions come first

    for t, (start, stop) in enumerate(actions.stages):
        # one policy call for every image, each masked by its own feasibility
        obs = torch.cat([observe(g.state, t, S, budget_frac[g.idx], spent[g.idx] / table.full_macs, n0, D) for g in groups])
        feas = torch.cat([table.feasible(t, g.state.x.shape[1], spent[g.idx] + overhead, budget_macs[g.idx]) for g in groups])
        dec = policy.act(obs, feas, actions.active(t), fixed, greedy, generator)
        order = torch.cat([g.idx for g in groups])
        all_actions[order, t] = dec.actions
        if rtg:
            obs_all[order, t] = obs
            for d, m in enumerate(dec.masks):
                masks_all[d][order, t] = m
            logp_all[order, t] = dec.logp
        flat = table.combo_index(dec.actions)
        # regroup: every image with the same (tokens, merged?, combo) runs the stage together
        owner = torch.cat([torch.full((g.idx.shape[0],), k) for k, g in enumerate(groups)])
        local = torch.cat([torch.arange(g.idx.shape[0]) for g in groups])
        n_in = torch.tensor([g.state.x.shape[1] for g in groups])[owner]
        merged = torch.tensor([g.state.size is not None for g in groups], dtype=torch.long)[owner]
        new_groups = []
        for pos in _partition(torch.stack([n_in, merged, flat], dim=1)):
            combo = int(flat[pos[0]])
            d = actions.decision(table.combos[combo].tolist())
            parts = [(groups[k], local[pos[owner[pos] == k]]) for k in owner[pos].unique().tolist()]
            g = _concat(parts, d.embed, p)
            with net():
                if t == 0 and not exact_slice:
                    g = Group(g.idx, TokenState(engine.embed(vit, images[g.idx.to(dev)], d.embed), None, p))
                n = g.state.x.shape[1]
                g.state = _run_blocks(vit, g.state, start, stop, d, actions.stage_ops(t, d), counts, g.idx)
            spent[g.idx] += float(table.cost[t, n, combo])
            new_groups.append((g, combo))
        groups = [g for g, _ in new_groups]

        if rtg and t < S - 1:
            # Result-to-Go completions, batched by (tokens, merged?, channels)
            combos = torch.tensor([c for _, c in new_groups])
            chan = table.combos[combos][:, channels]
            keys = torch.cat(
                [
                    torch.tensor([[g.state.x.shape[1], g.state.size is not None] for g in groups], dtype=torch.long),
                    chan,
                ],
                dim=1,
            )
            for members in _partition(keys):
                first = int(members[0])
                d = actions.decision(table.combos[combos[first]].tolist())
                parts = [(groups[k], torch.arange(groups[k].idx.shape[0])) for k in members.tolist()]
                g = _concat(parts, d.embed, p)
                with net():
                    c_state = _run_blocks(vit, g.state, stop, arch.depth, d, [None] * (arch.depth - stop))
                    cont_logits[g.idx, t] = engine.head(vit, c_state).float().cpu()
                n_out = g.state.x.shape[1]
                cont_macs[g.idx, t] = spent[g.idx] + float(table.cont_rest[t, n_out, combos[first]]) + overhead
                c_counts = counts[g.idx].clone()
                c_counts[:, stop:] = n_out
                cont_tokens[g.idx, t] = c_counts.float().mean(dim=1) / n0

    for g in groups:
        with net():
            logits[g.idx] = engine.head(vit, g.state).float().cpu()
    macs = spent + overhead
    tok = counts.float().mean(dim=1) / n0
    final_tok = counts[:, -1].float() / n0
    if rtg:
        cont_logits[:, S - 1] = logits
        cont_macs[:, S - 1] = macs
        cont_tokens[:, S - 1] = tok
    return Episode(logits, macs, tok, final_tok, all_actions, obs_all, masks_all, logp_all, cont_logits, cont_macs, cont_tokens, len(groups))


def decisions_of(actions: ActionSpace, episode: Episode, i: int) -> list[StageDecision]:
    """The per-stage decisions image ``i`` ran."""
    return [actions.decision(episode.actions[i, t].tolist()) for t in range(actions.num_stages)]
