"""The execution engine: a timm VisionTransformer's forward, written as pure functions
over its modules, that runs any sub-network (first-k slices of the shared weights) and
any token plan.

With the full sub-network and no token plan it computes exactly what timm computes
(same ops in the same order, fused attention included). Slicing uses views of the
parameters, so gradients flow into the shared weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prance.models.subnet import SubNet
from prance.tokens.state import CLS_ATTN, METRIC, V_NORM, TokenOp, TokenPlan, TokenState


def layer_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """LayerNorm over the first ``x.shape[-1]`` channels of ``norm`` (identity passes)."""
    if isinstance(norm, nn.Identity):
        return x
    c = x.shape[-1]
    if c == norm.normalized_shape[0]:
        return norm(x)
    w = None if norm.weight is None else norm.weight[:c]
    b = None if norm.bias is None else norm.bias[:c]
    return F.layer_norm(x, (c,), w, b, norm.eps)


def _layer_scale(ls: nn.Module, x: Tensor) -> Tensor:
    if isinstance(ls, nn.Identity):
        return x
    return x * ls.gamma[: x.shape[-1]]


def _linear(x: Tensor, layer: nn.Linear, out: int) -> Tensor:
    """``layer`` restricted to its first ``out`` outputs and first ``x.shape[-1]`` inputs."""
    w, b = layer.weight, layer.bias
    if out != w.shape[0] or x.shape[-1] != w.shape[1]:
        w = w[:out, : x.shape[-1]]
        b = None if b is None else b[:out]
    return F.linear(x, w, b)


def resize_width(x: Tensor, width: int) -> Tensor:
    """Move the residual stream to ``width`` channels: drop the last ones or add zeros."""
    c = x.shape[-1]
    if c == width:
        return x
    if c > width:
        return x[..., :width]
    return F.pad(x, (0, width - c))


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, N) batch are: ``rows``, their positions in
    the flattened B*N token grid. A packed tensor (T, C) holds them one after the other."""

    rows: Tensor
    batch: int
    tokens: int

    @staticmethod
    def of(size: Tensor) -> "Packing":
        b, n = size.shape[:2]
        return Packing((size.reshape(b * n) > 0).nonzero().squeeze(1), b, n)

    def pack(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.tokens, -1).index_select(0, self.rows)

    def unpack(self, packed: Tensor, into: Tensor) -> Tensor:
        """``into`` (B, N, C) with its real tokens replaced by ``packed``."""
        return into.reshape(self.batch * self.tokens, -1).index_copy(0, self.rows, packed.to(into.dtype)).reshape(into.shape)


def attention(attn: nn.Module, x: Tensor, heads: int, bias: Tensor | None, needs: frozenset[str],
              packing: Packing | None = None) -> tuple[Tensor, dict]:
    """timm ``Attention`` with its first ``heads`` heads and ``x``'s width.

    ``bias`` (B, 1, 1, N) is added to the logits (proportional attention). Returns the
    projected output and the attention facts named in ``needs``. With ``packing``, ``x``
    and the output are packed (T, C): the projections run on the real tokens only, the
    attention itself on the padded (B, N) layout.
    """
    if packing is None:
        b_, n, c = x.shape
    else:
        b_, n, c = packing.batch, packing.tokens, x.shape[-1]
    hd, h_all = attn.head_dim, attn.num_heads
    a = heads * hd
    w, b = attn.qkv.weight, attn.qkv.bias
    if heads != h_all or c != w.shape[1]:
        w = w.view(3, h_all * hd, -1)[:, :a, :c].reshape(3 * a, c)
        b = None if b is None else b.view(3, h_all * hd)[:, :a].reshape(3 * a)
    qkv = F.linear(x, w, b)
    if packing is not None:
        qkv = packing.unpack(qkv, qkv.new_zeros(b_, n, 3 * a))
    q, k, v = qkv.reshape(b_, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    facts = {}
    if CLS_ATTN in needs:
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        facts[CLS_ATTN] = logits.softmax(dim=-1).squeeze(2)
    if METRIC in needs:
        facts[METRIC] = k.mean(dim=1)
    if V_NORM in needs:  # the norm of each token's whole value vector, all heads concatenated
        facts[V_NORM] = torch.linalg.vector_norm(v, dim=(1, 3))
    o = o.transpose(1, 2).reshape(b_, n, a)
    if packing is not None:
        o = packing.pack(o)
    return attn.proj_drop(_linear(o, attn.proj, c)), facts


def mlp(m: nn.Module, x: Tensor, hidden: int) -> Tensor:
    """timm ``Mlp`` with its first ``hidden`` hidden units and ``x``'s width."""
    h = m.drop1(m.act(_linear(x, m.fc1, hidden)))
    return m.drop2(_linear(h, m.fc2, x.shape[-1]))


def embed(vit: nn.Module, images: Tensor, width: int) -> Tensor:
    """Patch embedding (after a hybrid ViT's conv stem), prefix tokens and position
    embedding at ``width`` channels."""
    return embed_features(vit, stem(vit, images), width)


def stem(vit: nn.Module, images: Tensor) -> Tensor:
    """What the patch projection reads: the images, or a hybrid ViT's conv-stem feature
    map. It does not depend on the width, so images embedded at several widths share it.
    uint8 images (as :func:`prance.data.held_images` holds them) are scaled, resized and
    normalised here, per batch on their device (:func:`prance.data.preprocess`)."""
    if images.dtype == torch.uint8:
        from prance.data import input_spec_for_model, preprocess

        images = preprocess(images, input_spec_for_model(vit))
    pe = vit.patch_embed
    expected = tuple(pe.img_size)
    if tuple(images.shape[-2:]) != expected:
        raise ValueError(f"input size {tuple(images.shape[-2:])} does not match the model's {expected}")
    backbone = getattr(pe, "backbone", None)
    if backbone is not None:  # hybrid ViT: a convolutional stem makes the feature map
        images = backbone(images)
        if isinstance(images, (list, tuple)):
            images = images[-1]
    return images


def embed_features(vit: nn.Module, images: Tensor, width: int) -> Tensor:
    """:func:`embed` from :func:`stem`'s output."""
    pe = vit.patch_embed
    conv = pe.proj
    x = F.conv2d(images, conv.weight[:width], None if conv.bias is None else conv.bias[:width], conv.stride, conv.padding)
    x = layer_norm(x.flatten(2).transpose(1, 2), getattr(pe, "norm", nn.Identity()))
    bsz = x.shape[0]
    prefix = [t[..., :width].expand(bsz, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    pos = vit.pos_embed[..., :width]
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    x = vit.patch_drop(vit.pos_drop(x))
    return layer_norm(x, vit.norm_pre)


def block(
    blk: nn.Module,
    state: TokenState,
    heads: int,
    hidden: int,
    width: int,
    op: TokenOp | None,
    *,
    prop_attn: bool,
    pack: bool = False,
) -> TokenState:
    """One pre-norm timm ``Block``, with ``op`` between its attention and its MLP.

    ``pack``: where the state holds padding (tokens of size 0, as per-image adaptive
    execution batches images of different token counts), the token-wise computation
    (norms, projections, MLP, residuals) runs on the real tokens only; the result is the
    same, the padding costs only its share of the attention itself."""
    x = resize_width(state.x, width)
    size = state.size
    if pack and size is not None and prop_attn:
        return _packed_block(blk, x, state, heads, hidden, op)
    bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
    needs = op.needs if op is not None else frozenset()
    out, facts = attention(blk.attn, layer_norm(x, blk.norm1), heads, bias, needs)
    x = x + blk.drop_path1(_layer_scale(blk.ls1, out))
    if op is not None:
        s = op.apply(TokenState(x, size, state.num_prefix, stats=state.stats, **facts))
        x, size = s.x, s.size
    x = x + blk.drop_path2(_layer_scale(blk.ls2, mlp(blk.mlp, layer_norm(x, blk.norm2), hidden)))
    return TokenState(x, size, state.num_prefix, stats=state.stats)


def _packed_block(blk: nn.Module, x: Tensor, state: TokenState, heads: int, hidden: int, op: TokenOp | None) -> TokenState:
    """:func:`block` with proportional attention on the real tokens of a padded state."""
    size, p = state.size, state.num_prefix
    where = Packing.of(size)
    xp = where.pack(x)
    needs = op.needs if op is not None else frozenset()
    out, facts = attention(blk.attn, layer_norm(xp, blk.norm1), heads, size.log()[:, None, None, :, 0], needs, where)
    xp = xp + blk.drop_path1(_layer_scale(blk.ls1, out))
    if op is not None:
        s = op.apply(TokenState(where.unpack(xp, x), size, p, stats=state.stats, **facts))
        x, size = s.x, s.size
        if size is None:  # no padding left
            x = x + blk.drop_path2(_layer_scale(blk.ls2, mlp(blk.mlp, layer_norm(x, blk.norm2), hidden)))
            return TokenState(x, None, p, stats=state.stats)
        where = Packing.of(size)
        xp = where.pack(x)
    xp = xp + blk.drop_path2(_layer_scale(blk.ls2, mlp(blk.mlp, layer_norm(xp, blk.norm2), hidden)))
    return TokenState(where.unpack(xp, x), size, p, stats=state.stats)


def run_blocks(
    vit: nn.Module,
    state: TokenState,
    subnet: SubNet,
    plan: TokenPlan,
    start: int = 0,
    stop: int | None = None,
) -> TokenState:
    """Blocks ``start``..``stop-1``; when ``state.stats`` is a dict, the token count
    entering each block is appended to ``stats['tokens']``."""
    stop = len(vit.blocks) if stop is None else stop
    for i in range(start, stop):
        if state.stats is not None:
            state.stats.setdefault("tokens", []).append(state.x.shape[1])
        state = block(vit.blocks[i], state, subnet.heads[i], subnet.mlp[i], subnet.embed[i], plan.ops[i], prop_attn=plan.prop_attn)
    return state


def head(vit: nn.Module, state: TokenState) -> Tensor:
    """Final norm, pooling (size-weighted for average pooling) and classifier."""
    x = layer_norm(state.x, vit.norm)
    if vit.global_pool == "token":
        x = x[:, 0]
    else:
        first = 0 if vit.pool_include_prefix else state.num_prefix
        x = x[:, first:]
        if state.size is None:
            x = x.mean(dim=1)
        else:
            s = state.size[:, first:]
            x = (x * s).sum(dim=1) / s.sum(dim=1)
    x = vit.head_drop(layer_norm(x, vit.fc_norm))
    return _linear(x, vit.head, vit.head.out_features)


def forward(vit: nn.Module, images: Tensor, subnet: SubNet, plan: TokenPlan, stats: dict | None = None) -> Tensor:
    """Logits of sub-network ``subnet`` under token plan ``plan``."""
    state = TokenState(embed(vit, images, subnet.embed[0]), None, vit.num_prefix_tokens, stats=stats)
    state = run_blocks(vit, state, subnet, plan)
    return head(vit, state)
