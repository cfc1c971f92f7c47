"""Per-input adaptive execution of the meta-network under a selector, in dense batches.

At each decision point the policy runs once on the features of every image in the batch
and picks a decision per image. All images whose decision has the same widths run the
stage as one sub-batch, whatever their token counts: each image's tokens come first in
its row and the rest is padding of size 0, which attention (the size bias, log 0 = -inf)
and size-weighted pooling ignore, so every image computes exactly what it would alone.
Inside a block the token-wise work (qkv, projection, MLP) runs on the real tokens only,
packed (engine.block(pack=True)); only attention sees the padding. Token operations run
per row on the padded batch (prune_rows, merge_rows) where the schedules allow, else per
*schedule* (images with the same tokens and decision) on their own unpadded tokens. A
width is split into more sub-batches only where :data:`CALL_MACS` says padding costs
more than a block call (never, by default). No loop over single
images, no averaging of decisions over the batch: an image's result does not depend on
its batch-mates. The MACs counted are each image's own (padding is not counted: it is
an execution cost, which the throughput benchmark measures).

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
import torch.nn.functional as F
from torch import Tensor

from prance.device import autocast_for
from prance.models import engine
from prance.models.arch import ArchSpec
from prance.models.meta import MetaViT
from prance.selector.actions import ActionSpace, CostTable, StageDecision
from prance.selector.features import observe
from prance.selector.policy import ActorCritic
from prance.tokens.merge import merge_rows
from prance.tokens.prune import prune_rows
from prance.tokens.state import TokenOp, TokenState


# What one more sub-batch costs, per block, in MACs of padded compute it is worth: a
# schedule runs in a sub-batch of its own only where padding it into a wider one would
# waste more. With token-wise work packed to real tokens (engine.block(pack=True)) only
# attention still computes padding, and on 2 CPU cores splitting a width lost at every
# threshold tried (6.5M MACs, the fixed cost of a block call, was the best of them;
# docs/benchmarks.md, "Adaptive execution"). On a GPU kernel launches dominate at these
# sizes. So by default a width is never split; an explicit call_macs keeps the exact DP.
CALL_MACS = {"cpu": None, "cuda": None}  # None: never split a width


@dataclass
class Group:
    """Images that run a stage as one dense sub-batch: the same widths, and tokens padded
    to a common count. ``n`` holds each image's own token count; its tokens are the first
    ``n`` of the row, the rest are padding with size 0, which the size bias of attention
    (log 0 = -inf) and size-weighted pooling ignore."""

    idx: Tensor  # positions in the batch
    state: TokenState
    n: Tensor  # (g,) tokens of each image (CPU)


@dataclass
class RowSpan:
    """Images of one group with the same schedule (tokens and decision): rows
    ``start``..``stop-1`` of the group, which holds its spans one after the other; one
    token operation each."""

    start: int
    stop: int
    n: int
    combo: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def _per_row(values: list, spans: list[RowSpan], dtype=torch.long, device=None) -> Tensor:
    """One value per schedule, repeated over its rows: (rows of the group,)."""
    lengths = torch.tensor([s.stop - s.start for s in spans], device=device)
    return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(lengths)


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
    groups: int = 0  # distinct per-image schedules in the batch
    sub_batches: int = 0  # stage (and completion) sub-batches that ran


def _partition(keys: Tensor) -> list[Tensor]:
    """Positions of each distinct row of ``keys`` (N, k)."""
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    order = inverse.argsort(stable=True)
    counts = torch.bincount(inverse).tolist()
    return list(order.split(counts))


def _buckets(rows: list[int], tokens: list[int], cost: Tensor, call_macs: float | None) -> list[list[int]]:
    """The cheapest split of one width's schedules into padded sub-batches. Schedule ``j``
    has ``rows[j]`` images with ``tokens[j]`` tokens; ``cost[i, j]`` is the MACs per image
    of schedule ``j`` padded to schedule ``i``'s tokens; a sub-batch costs its padded MACs
    plus ``call_macs`` (None: a split is never worth it). Sorted by tokens, an optimal
    split is contiguous: an exact dynamic programme over the (few) schedules."""
    k = len(rows)
    order = sorted(range(k), key=lambda j: -tokens[j])
    if call_macs is None or k == 1:
        return [order]
    o = torch.tensor(order)
    padded = cost[o][:, o] * torch.tensor([rows[j] for j in order], dtype=torch.float64)  # [i, j]: j padded to i's tokens
    prefix = torch.cumsum(padded, dim=1).tolist()
    best = [0.0] * (k + 1)
    cut = [0] * (k + 1)
    for j in range(1, k + 1):  # best[j]: the first j schedules (most tokens first)
        options = [best[i] + prefix[i][j - 1] - (prefix[i][i - 1] if i else 0.0) + call_macs for i in range(j)]
        i = min(range(j), key=options.__getitem__)
        best[j], cut[j] = options[i], i
    out, j = [], k
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def _take(parts: list[tuple[Group, Tensor, Tensor]], width: int, tokens: int, num_prefix: int, size: int) -> Group:
    """One group of ``size`` rows at ``width`` channels and ``tokens`` tokens (each row's
    own tokens first, then padding of size 0): each part ``(group, rows, dest)`` puts
    the rows ``rows`` of ``group`` at the rows ``dest`` of the new one."""
    g0 = parts[0][0]
    dev = g0.state.x.device
    padded = any(g.state.size is not None for g, _, _ in parts) or any(int(g.n[r].min()) < tokens for g, r, _ in parts if len(r))
    x = g0.state.x.new_zeros(size, tokens, width)
    sizes = torch.zeros(size, tokens, 1, device=dev, dtype=g0.state.sizes().dtype) if padded else None
    idx = torch.empty(size, dtype=torch.long)
    n = torch.empty(size, dtype=torch.long)
    for g, rows, dest in parts:
        r, d = rows.to(dev), dest.to(dev)
        have, w = min(g.state.x.shape[1], tokens), min(g.state.x.shape[2], width)  # wider: zeros (engine.resize_width)
        x[d, :have, :w] = g.state.x[r, :have, :w]
        if padded:
            sizes[d, :have] = g.state.sizes()[r][:, :have].to(sizes.dtype)
        idx[dest] = g.idx[rows]
        n[dest] = g.n[rows]
    return Group(idx, TokenState(x, sizes, num_prefix), n)


def _per_schedule(ops: list[TokenOp | None], spans: list[RowSpan]) -> TokenOp | None:
    """A block's token operation for a group: schedule ``j``'s rows get ``ops[j]``, as
    on their own (unpadded) tokens, and the results are padded to a common count --
    pruning and merging as batched per-row operations, anything else schedule by schedule."""
    if all(op is None for op in ops):
        return None
    if len(spans) == 1:
        return ops[0]  # one schedule: the rows hold no padding the op could see
    needs = frozenset().union(*(op.needs for op in ops if op is not None))
    steps = _row_steps(ops)

    def apply(state: TokenState) -> TokenState:
        if steps is not None and ("merge" not in steps or state.num_prefix <= 1):
            return _per_row_steps(state, steps, ops, spans)
        return _each_schedule(state, ops, spans)

    return TokenOp("per_schedule", apply, lambda n: n, needs=needs)


def _each_schedule(state: TokenState, ops: list[TokenOp | None], spans: list[RowSpan]) -> TokenState:
    """Schedule ``j``'s rows through ``ops[j]`` on their own tokens, one schedule at a time."""
    outs = []
    for span, op in zip(spans, ops):
        part = TokenState(
            state.x[span.rows, : span.n],
            state.sizes()[span.rows, : span.n],
            state.num_prefix,
            cls_attn=None if state.cls_attn is None else state.cls_attn[span.rows, :, : span.n],
            metric=None if state.metric is None else state.metric[span.rows, : span.n],
            v_norm=None if state.v_norm is None else state.v_norm[span.rows, : span.n],
        )
        outs.append(part if op is None else op.apply(part))
    top = max(o.x.shape[1] for o in outs)
    x = state.x.new_zeros(state.x.shape[0], top, state.x.shape[2])
    size = state.x.new_zeros(state.x.shape[0], top, 1, dtype=torch.float32)
    for span, o in zip(spans, outs):
        x[span.rows, : o.x.shape[1]] = o.x.to(x.dtype)
        size[span.rows, : o.x.shape[1]] = o.sizes().float()
    return TokenState(x, size, state.num_prefix, stats=state.stats)


def _parts(op: TokenOp | None) -> tuple[TokenOp, ...]:
    return () if op is None else (op.parts or (op,))


def _row_steps(ops: list[TokenOp | None]) -> list[str] | None:
    """The steps (``"prune"``, then ``"merge"``) that run every schedule's operation as
    one batched per-row operation each; None where some operation has no per-row version."""
    kinds = [[part.name for part in _parts(op)] for op in ops]
    steps = [k for k in ("prune", "merge") if any(k in ks for ks in kinds)]
    if any(ks != [k for k in steps if k in ks] or len(set(ks)) != len(ks) for ks in kinds):
        return None
    return steps


def _per_row_steps(state: TokenState, steps: list[str], ops: list[TokenOp | None], spans: list[RowSpan]) -> TokenState:
    """Schedule ``j``'s rows get ``ops[j]``, each step one per-row operation for all rows
    (:func:`prune_rows`, :func:`merge_rows`; a row without that step keeps its tokens)."""
    dev, p = state.x.device, state.num_prefix
    n = [s.n for s in spans]
    for step in steps:
        part = [next((q for q in _parts(op) if q.name == step), None) for op in ops]
        out = [m if q is None else q.out_tokens(m) for m, q in zip(n, part)]
        counts = _per_row(n, spans, device=dev)
        if step == "prune":  # keep the top out - p patches
            state = prune_rows(state, counts, _per_row([o - p for o in out], spans, device=dev))
        else:  # merge n - out tokens
            state = merge_rows(state, counts, _per_row([m - o for m, o in zip(n, out)], spans, device=dev))
        n = out
    return state


def _run_stage(vit, g: Group, start: int, stop: int, dec: StageDecision, spans: list[RowSpan], ops: list[list], counts: Tensor) -> Group:
    """Blocks ``start``..``stop-1`` at ``dec``'s widths, schedule ``j`` with its per-block
    ``ops[j]``; ``counts`` (B, depth) records the tokens each image brings to each block."""
    n = [s.n for s in spans]
    for i in range(start, stop):
        block_ops = [ops[j][i - start] for j in range(len(spans))]
        counts[g.idx, i] = _per_row(n, spans)
        now = [RowSpan(s.start, s.stop, n[j], s.combo) for j, s in enumerate(spans)]
        g.state = engine.block(vit.blocks[i], g.state, dec.heads, dec.mlp, dec.embed, _per_schedule(block_ops, now),
                               prop_attn=True, pack=True)
        n = [m if op is None else op.out_tokens(m) for m, op in zip(n, block_ops)]
    g.n = _per_row(n, spans)
    return g


def _feasible(table: CostTable, t: int, g: Group, spent: Tensor, budget: Tensor) -> Tensor:
    """The budget mask of every image of ``g`` (images differ in their tokens)."""
    if bool((g.n == g.n[0]).all()):
        return table.feasible(t, int(g.n[0]), spent, budget)
    out = torch.zeros(len(g.n), *table.actions.sizes, dtype=torch.bool)
    for n in g.n.unique().tolist():
        rows = (g.n == n).nonzero().flatten()
        out[rows] = table.feasible(t, n, spent[rows], budget[rows])
    return out


@dataclass
class Completions:
    """The Result-to-Go completions of an episode: after the decision of stage ``t``, the
    rest of the network at that decision's channels and no further token reduction --
    each image's logits, MACs and token ratio; stage ``S-1`` holds the episode's own result."""

    logits: Tensor  # (B, S, classes)
    macs: Tensor  # (B, S) float64
    token_ratio: Tensor  # (B, S)

    @classmethod
    def zeros(cls, b: int, stages: int, classes: int) -> "Completions":
        return cls(torch.zeros(b, stages, classes), torch.zeros(b, stages, dtype=torch.float64), torch.zeros(b, stages))


@dataclass
class _Trace:
    """What an episode records per image and stage: the actions, and for training
    (``rtg``) the observations, masks, log-probabilities and completions."""

    actions: Tensor  # (B, S, dims)
    obs: Tensor | None = None  # (B, S, obs_dim)
    masks: list[Tensor] | None = None  # per dim (B, S, size)
    logp: Tensor | None = None  # (B, S)
    completions: Completions | None = None

    @classmethod
    def zeros(cls, b: int, actions: ActionSpace, obs_dim: int, classes: int, rtg: bool) -> "_Trace":
        S = actions.num_stages
        out = cls(torch.zeros(b, S, len(actions.dims), dtype=torch.long))
        if rtg:
            out.obs = torch.zeros(b, S, obs_dim)
            out.masks = [torch.zeros(b, S, s, dtype=torch.bool) for s in actions.sizes]
            out.logp = torch.zeros(b, S)
            out.completions = Completions.zeros(b, S, classes)
        return out


@dataclass
class _Pass:
    """One episode's meta-network, action space and cost table, where and how it runs,
    and its running totals: what every stage step shares."""

    vit: torch.nn.Module
    arch: ArchSpec
    actions: ActionSpace
    table: CostTable
    dev: torch.device
    amp: bool
    call_macs: float | None  # what one more sub-batch per block is worth in padded MACs
    overhead: float  # the policy's MACs over all stages
    spent: Tensor  # (B,) float64: MACs so far
    counts: Tensor  # (B, depth): tokens entering each block

    def net(self):
        """The meta-network's own computation: on the device, mixed precision with amp."""
        return autocast_for(self.dev, self.amp)

    def decision(self, combo: int) -> StageDecision:
        return self.actions.decision(self.table.combos[combo].tolist())

    def width_of(self, combo: int) -> int:
        return self.decision(combo).embed


@torch.no_grad()
def run_episode(
    meta: MetaViT,
    actions: ActionSpace,
    table: CostTable,
    policy: ActorCritic,
    images: Tensor,
    budget_macs: Tensor,
    *,
    greedy: bool = True,
    generator: torch.Generator | None = None,
    rtg: bool = False,
    amp: bool = False,
    call_macs: float | None | str = "auto",
    cap_macs: Tensor | None = None,
) -> Episode:
    """Run ``images`` adaptively with a per-image MACs budget ``budget_macs`` (B,) on
    ``images``' device (the meta-network must be there); the episode's tensors are on
    the CPU. The policy sees the budget; its actions are masked to ``cap_macs`` (B,)
    per image (default: the budget itself). ``call_macs``: what one more sub-batch per block is worth in padded MACs
    (``"auto"``: :data:`CALL_MACS` of the device; 0: never pad, None: never split a width)."""
    arch, vit = meta.arch, meta.vit
    b, S = images.shape[0], actions.num_stages
    dev = images.device
    if call_macs == "auto":
        call_macs = CALL_MACS.get(dev.type, CALL_MACS["cuda"])
    budget_macs = budget_macs.cpu()
    cap_macs = budget_macs if cap_macs is None else cap_macs.cpu()
    ep = _Pass(vit, arch, actions, table, dev, amp, call_macs, float(policy.actor_macs() * S),
               torch.zeros(b, dtype=torch.float64), torch.zeros(b, arch.depth, dtype=torch.long))
    with ep.net():
        stem_out = engine.stem(vit, images)  # shared by the embeddings at every width
        x = engine.embed_features(vit, stem_out, arch.embed_dim)
    exact_slice = isinstance(vit.norm_pre, torch.nn.Identity) and isinstance(getattr(vit.patch_embed, "norm", torch.nn.Identity()), torch.nn.Identity)
    groups = [Group(torch.arange(b), TokenState(x, None, arch.num_prefix_tokens), torch.full((b,), x.shape[1]))]
    trace = _Trace.zeros(b, actions, policy.obs_dim, arch.num_classes, rtg)
    sub_batches = 0
    for t, (start, stop) in enumerate(actions.stages):
        flat = _decide(ep, policy, groups, t, budget_macs, cap_macs, greedy, generator, trace)
        groups = _stage(ep, groups, t, start, stop, flat, None if exact_slice else stem_out)
        sub_batches += len(groups)
        if rtg and t < S - 1:
            sub_batches += _completions(ep, groups, trace.actions[:, t], stop, trace.completions, t)
    return _finish(ep, groups, trace, sub_batches)


def _decide(ep: _Pass, policy: ActorCritic, groups: list[Group], t: int, budget_macs: Tensor, cap_macs: Tensor,
            greedy: bool, generator: torch.Generator | None, trace: _Trace) -> Tensor:
    """Stage ``t``'s decisions: one policy call for every image, each masked by its own
    feasibility, recorded in ``trace``; the combination index of each image, in the
    order of ``groups``."""
    actions, table, arch = ep.actions, ep.table, ep.arch
    S = actions.num_stages
    budget_frac = budget_macs.double() / table.full_macs
    fixed = tuple(actions.fixed_index(d) for d in range(len(actions.dims)))
    obs = torch.cat([observe(g.state, t, S, budget_frac[g.idx], ep.spent[g.idx] / table.full_macs, arch.num_tokens, arch.embed_dim, g.n)
                     for g in groups])
    feas = torch.cat([_feasible(table, t, g, ep.spent[g.idx] + ep.overhead, cap_macs[g.idx]) for g in groups])
    dec = policy.act(obs, feas, actions.active(t), fixed, greedy, generator)
    order = torch.cat([g.idx for g in groups])
    trace.actions[order, t] = dec.actions
    if trace.obs is not None:
        trace.obs[order, t] = obs
        for d, m in enumerate(dec.masks):
            trace.masks[d][order, t] = m
        trace.logp[order, t] = dec.logp
    return table.combo_index(dec.actions)


def _stage(ep: _Pass, groups: list[Group], t: int, start: int, stop: int, flat: Tensor, stem_out: Tensor | None) -> list[Group]:
    """Blocks ``start``..``stop-1`` for every image at its decision ``flat`` (combination
    indices in the order of ``groups``): every image of one width runs the stage in one
    sub-batch (or a few, where padding the fewer-token schedules costs more than a split);
    each schedule (tokens, decision) gets its own token operations inside it. ``stem_out``:
    the stem's output, to embed at each width in stage 0 (None: slicing the full-width
    embedding is exact)."""
    actions, table = ep.actions, ep.table
    n_in = torch.cat([g.n for g in groups])
    p = ep.arch.num_prefix_tokens
    call_macs = ep.call_macs and ep.call_macs * (stop - start)
    new_groups = []
    for g, spans in _regroup(groups, table.combos[flat][:, : actions.num_width_dims], n_in, flat, ep.width_of, table.cost[t], call_macs, p, ep.dev):
        d = ep.decision(spans[0].combo)
        ops = [actions.stage_ops(t, ep.decision(s.combo)) for s in spans]
        with ep.net():
            if t == 0 and stem_out is not None:
                g = Group(g.idx, TokenState(engine.embed_features(ep.vit, stem_out[g.idx.to(ep.dev)], d.embed), None, p), g.n)
            g = _run_stage(ep.vit, g, start, stop, d, spans, ops, ep.counts)
        ep.spent[g.idx] += _per_row([float(table.cost[t, s.n, s.combo]) for s in spans], spans, dtype=torch.float64)
        new_groups.append(g)
    return new_groups


def _finish(ep: _Pass, groups: list[Group], trace: _Trace, sub_batches: int) -> Episode:
    """The head on every group, and the episode's results."""
    arch = ep.arch
    b, S = trace.actions.shape[:2]
    logits = torch.zeros(b, arch.num_classes)
    for g in groups:
        with ep.net():
            logits[g.idx] = engine.head(ep.vit, g.state).float().cpu()
    macs = ep.spent + ep.overhead
    tok = ep.counts.float().mean(dim=1) / arch.num_tokens
    final_tok = ep.counts[:, -1].float() / arch.num_tokens
    cont = trace.completions
    if cont is not None:
        cont.logits[:, S - 1] = logits
        cont.macs[:, S - 1] = macs
        cont.token_ratio[:, S - 1] = tok
    distinct = len(torch.unique(torch.cat([trace.actions.flatten(1), ep.counts], dim=1), dim=0))
    return Episode(
        logits=logits, macs=macs, token_ratio=tok, final_token_ratio=final_tok, actions=trace.actions, obs=trace.obs,
        masks=trace.masks, logp=trace.logp, cont_logits=None if cont is None else cont.logits,
        cont_macs=None if cont is None else cont.macs, cont_token_ratio=None if cont is None else cont.token_ratio,
        groups=distinct, sub_batches=sub_batches,
    )


def _regroup(groups: list[Group], widths: Tensor, n_in: Tensor, flat: Tensor, width_of, cost: Tensor, call_macs, p: int, dev) -> list[tuple[Group, list[RowSpan]]]:
    """The sub-batches of the next stage: the images of ``groups`` (in their order; one
    row of ``widths``, ``n_in``, ``flat`` each) partitioned by their widths, each width's
    schedules ``(n_in, flat)`` bucketed by :func:`_buckets` (``cost[n, combo]``: MACs
    per image), each bucket's rows gathered into one group at ``width_of(combo)``
    embedding channels, schedule after schedule."""
    owner = torch.cat([torch.full((g.idx.shape[0],), k) for k, g in enumerate(groups)])
    local = torch.cat([torch.arange(g.idx.shape[0]) for g in groups])
    out = []
    for members in _partition(widths):
        scheds = [members[s] for s in _partition(torch.stack([n_in[members], flat[members]], dim=1))]
        first = torch.stack([s[0] for s in scheds])
        n, c = n_in[first], flat[first]
        n_list, c_list = n.tolist(), c.tolist()
        for bucket in _buckets([len(s) for s in scheds], n_list, cost[n[:, None], c[None, :]], call_macs):
            pos = torch.cat([scheds[j] for j in bucket])  # the new group's rows, schedule after schedule
            own = owner[pos]
            parts = [(groups[k], local[pos[own == k]], (own == k).nonzero().flatten()) for k in own.unique().tolist()]
            g = _take(parts, width_of(c_list[bucket[0]]), max(n_list[j] for j in bucket), p, len(pos))
            spans, at = [], 0
            for j in bucket:
                spans.append(RowSpan(at, at + len(scheds[j]), n_list[j], c_list[j]))
                at += len(scheds[j])
            out.append((g, spans))
    return out


def _completions(ep: _Pass, groups: list[Group], stage_actions: Tensor, stop: int, cont: Completions, t: int) -> int:
    """Result-to-Go completions after stage ``t``: for every image, the rest of the network
    at its channels of stage ``t`` and no further token reduction, into ``cont`` --
    batched by channels, tokens padded as in the stages. Returns the sub-batches it ran."""
    actions, table, vit = ep.actions, ep.table, ep.vit
    p = ep.arch.num_prefix_tokens
    idx = torch.cat([g.idx for g in groups])
    flat = table.combo_index(stage_actions[idx])
    widths = table.combos[flat][:, : actions.num_width_dims]
    n_out = torch.cat([g.n for g in groups])
    ran = 0
    # rows of one width with different keeps share a sub-batch: the completion reduces no tokens
    rest = len(vit.blocks) - stop
    for g, _ in _regroup(groups, widths, n_out, flat, ep.width_of, table.cont_rest[t], ep.call_macs and ep.call_macs * rest, p, ep.dev):
        combos = table.combo_index(stage_actions[g.idx])
        d = ep.decision(int(combos[0]))
        with ep.net():
            state = g.state
            for i in range(stop, len(vit.blocks)):
                state = engine.block(vit.blocks[i], state, d.heads, d.mlp, d.embed, None, prop_attn=True, pack=True)
            cont.logits[g.idx, t] = engine.head(vit, state).float().cpu()
        cont.macs[g.idx, t] = ep.spent[g.idx] + table.cont_rest[t, g.n, combos].double() + ep.overhead
        c_counts = ep.counts[g.idx].clone()
        c_counts[:, stop:] = g.n[:, None]
        cont.token_ratio[g.idx, t] = c_counts.float().mean(dim=1) / ep.arch.num_tokens
        ran += 1
    return ran
