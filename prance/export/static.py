"""A static configuration as a standalone module: the meta-network's weights sliced to the
active channels once, so the module holds only what the configuration runs and its
forward slices nothing.

:func:`slice_static` builds :class:`StaticViT` from a meta-network and a
:class:`~prance.static_search.StaticConfig`; :func:`save` writes it as
``model.safetensors`` (the sliced weights) + ``manifest.json`` (shapes, the token
strategy, how to rebuild a hybrid stem); :func:`load` reads it back. The forward is the
engine's (:mod:`prance.models.engine`) for that one sub-network, with the token strategy's
own operations (:mod:`prance.tokens`), so the logits equal the meta-network's.

PPT decides per image between pooling and pruning; the meta-network runs each image's
branch on a sub-batch (a data-dependent split). Here both branches run on the whole batch
and ``torch.where`` picks each image's (same token count either way), which traces into
one static graph for ONNX and torch.compile.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prance.errors import PranceError
from prance.models.engine import resize_width
from prance.tokens.merge import max_r, merge_tokens
from prance.tokens.ppt import significance
from prance.tokens.prune import keep_top
from prance.tokens.state import CLS_ATTN, METRIC, V_NORM, TokenOp, TokenPlan, TokenState

FORMAT = "prance.static_vit.v1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def _ln(width: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=eps)


class Block(nn.Module):
    """One pre-norm ViT block at fixed widths: ``width`` channels in the residual stream,
    ``heads`` heads of ``head_dim``, ``hidden`` MLP units."""

    def __init__(self, width: int, heads: int, head_dim: int, hidden: int, eps: float, qkv_bias: bool,
                 qk_norm: bool, layer_scale: bool, act: str):
        super().__init__()
        self.width, self.heads, self.head_dim = width, heads, head_dim
        self.scale = head_dim ** -0.5
        self.norm1 = _ln(width, eps)
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=qkv_bias)
        self.q_norm = _ln(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = _ln(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(heads * head_dim, width)
        self.norm2 = _ln(width, eps)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, width)
        self.gamma1 = nn.Parameter(torch.ones(width)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.ones(width)) if layer_scale else None

    def attention(self, x: Tensor, bias: Tensor | None, needs: frozenset) -> tuple[Tensor, dict]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        facts = {}
        if CLS_ATTN in needs:
            logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            facts[CLS_ATTN] = logits.softmax(dim=-1).squeeze(2)
        if METRIC in needs:
            facts[METRIC] = k.mean(dim=1)
        if V_NORM in needs:
            facts[V_NORM] = torch.linalg.vector_norm(v, dim=(1, 3))
        return self.proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)), facts

    def forward(self, state: TokenState, op: TokenOp | None, prop_attn: bool) -> TokenState:
        x, size = resize_width(state.x, self.width), state.size
        bias = size.log()[:, None, None, :, 0] if (prop_attn and size is not None) else None
        out, facts = self.attention(self.norm1(x), bias, op.needs if op is not None else frozenset())
        x = x + (out if self.gamma1 is None else out * self.gamma1)
        if op is not None:
            s = op.apply(TokenState(x, size, state.num_prefix, **facts))
            x, size = s.x, s.size
        h = self.fc2(self.act(self.fc1(self.norm2(x))))
        x = x + (h if self.gamma2 is None else h * self.gamma2)
        return TokenState(x, size, state.num_prefix)


def ppt_where(r: int, threshold: float, num_prefix: int) -> TokenOp:
    """PPT with both branches on every image and ``torch.where`` choosing per image: the
    same tokens as :func:`prance.tokens.ppt.ppt_tokens`, without its data-dependent split."""

    def apply(state: TokenState) -> TokenState:
        p, n = state.num_prefix, state.x.shape[1]
        rr = min(r, max_r(n, p))
        if rr <= 0:
            return state
        state = replace(state, size=state.sizes())
        scores = significance(state)
        pool = (scores.var(dim=-1) < threshold)[:, None, None]
        pooled = merge_tokens(state, rr)
        pruned = keep_top(state, scores, n - p - rr, by_score=True)
        return TokenState(torch.where(pool, pooled.x, pruned.x), torch.where(pool, pooled.size, pruned.size), p)

    def out_tokens(n: int) -> int:
        return n - min(r, max_r(n, num_prefix))

    return TokenOp("ppt", apply, out_tokens, needs=frozenset({CLS_ATTN, V_NORM, METRIC}))


class StaticViT(nn.Module):
    """A ViT sub-network with its token strategy, weights already sliced. ``forward(images)``
    returns the logits the meta-network gives for the same configuration."""

    def __init__(self, manifest: dict, stem: nn.Module | None = None):
        super().__init__()
        from prance.models.arch import ArchSpec
        from prance.tokens.strategies import StrategyConfig, build_plan

        m = manifest
        self.manifest = m
        a = m["arch"]
        self.arch = ArchSpec(**a)
        sub = m["subnet"]
        widths, eps = sub["embed"], m["eps"]
        self.stem = stem if stem is not None else nn.Identity()
        self.img_size = tuple(m["img_size"])
        in_chans, kernel, stride, padding = m["patch_conv"]
        self.patch = nn.Conv2d(in_chans, widths[0], kernel, stride, padding, bias=m["patch_bias"])
        self.patch_norm = _ln(widths[0], eps) if m["patch_norm"] else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, widths[0])) if m["class_token"] else None
        self.reg_token = nn.Parameter(torch.zeros(1, m["reg_tokens"], widths[0])) if m["reg_tokens"] else None
        self.pos_embed = nn.Parameter(torch.zeros(1, m["pos_tokens"], widths[0]))
        self.no_embed_class = m["no_embed_class"]
        self.norm_pre = _ln(widths[0], eps) if m["norm_pre"] else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(widths[i], sub["heads"][i], a["head_dim"], sub["mlp"][i], eps, m["qkv_bias"], m["qk_norm"],
                  m["layer_scale"], m["act"]) for i in range(a["depth"])
        )
        last = widths[-1]
        self.norm = _ln(last, eps) if m["norm"] else nn.Identity()
        self.fc_norm = _ln(last, eps) if m["fc_norm"] else nn.Identity()
        self.head = nn.Linear(last, a["num_classes"])
        self.global_pool, self.pool_include_prefix = a["global_pool"], m["pool_include_prefix"]
        s = m["strategy"]
        cfg = StrategyConfig(**{**s, "locs": None if s.get("locs") is None else tuple(s["locs"])})
        plan = build_plan(cfg, self.arch)
        if cfg.name == "ppt":
            r = plan.params["r"]
            plan = replace(plan, ops=tuple(None if op is None else ppt_where(r, cfg.threshold, self.arch.num_prefix_tokens)
                                           for op in plan.ops))
        self.plan: TokenPlan = plan

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_norm(self.patch(self.stem(images)).flatten(2).transpose(1, 2))
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        state = TokenState(self.norm_pre(x), None, self.arch.num_prefix_tokens)
        for blk, op in zip(self.blocks, self.plan.ops):
            state = blk(state, op, self.plan.prop_attn)
        x = self.norm(state.x)
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            first = 0 if self.pool_include_prefix else state.num_prefix
            x = x[:, first:]
            x = x.mean(dim=1) if state.size is None else (x * state.size[:, first:]).sum(dim=1) / state.size[:, first:].sum(dim=1)
        return self.head(self.fc_norm(x))


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise PranceError(f"export supports GELU MLPs; this model uses {type(act).__name__}")


def _is_ln(m) -> bool:
    return isinstance(m, nn.LayerNorm)


@torch.no_grad()
def slice_static(meta, config, model_name: str = "", model_kwargs: dict | None = None) -> StaticViT:
    """The standalone module of ``config`` (a StaticConfig) on ``meta`` (a MetaViT)."""
    vit, sub = meta.vit, config.subnet
    sub.check(meta.arch)
    manifest = _manifest(meta, config, model_name, model_kwargs, _layer_norm_eps(vit))
    if any(b.attn.proj.bias is None or b.mlp.fc1.bias is None or b.mlp.fc2.bias is None for b in vit.blocks):
        raise PranceError("export assumes biases on the attention projection and the MLP")
    backbone = getattr(vit.patch_embed, "backbone", None)
    stem = None
    if backbone is not None:
        import copy

        stem = copy.deepcopy(backbone).eval()
    out = StaticViT(manifest, stem)
    _copy_embedding(out, vit, sub.embed[0])
    for i, (dst, src) in enumerate(zip(out.blocks, vit.blocks)):
        _copy_block(dst, src, sub.embed[i], sub.heads[i], sub.mlp[i], meta.arch)
    last = sub.embed[-1]
    _copy_ln(out.norm, vit.norm, last)
    _copy_ln(out.fc_norm, vit.fc_norm, last)
    out.head.weight.copy_(vit.head.weight[:, :last])
    out.head.bias.copy_(vit.head.bias)
    return out.eval()


def _layer_norm_eps(vit) -> float:
    """The one LayerNorm epsilon of ``vit`` (PranceError where its norms differ)."""
    pe, blk0 = vit.patch_embed, vit.blocks[0]
    norms = [b.norm1 for b in vit.blocks]
    eps = norms[0].eps
    for n in (pe.norm if hasattr(pe, "norm") else None, vit.norm_pre, vit.norm, vit.fc_norm, *norms, blk0.attn.q_norm):
        if _is_ln(n) and n.eps != eps:
            raise PranceError("export assumes one LayerNorm epsilon across the model")
    return eps


def _manifest(meta, config, model_name: str, model_kwargs: dict | None, eps: float) -> dict:
    """What :class:`StaticViT` is built from, and what the export's manifest records."""
    vit, arch, sub = meta.vit, meta.arch, config.subnet
    pe, blk0 = vit.patch_embed, vit.blocks[0]
    backbone = getattr(pe, "backbone", None)
    manifest = {
        "format": FORMAT,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "configuration": config.describe(),
        "levels": list(config.levels),
        "strategy": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config.strategy).items()},
        "params": dict(config.plan.params),
        "gflops": config.gflops,
        "arch": asdict(arch),
        "subnet": sub.to_dict(),
        "eps": eps,
        "img_size": list(pe.img_size),
        "in_chans": vit.in_chans if hasattr(vit, "in_chans") else pe.proj.in_channels,
        "patch_conv": [pe.proj.in_channels, list(pe.proj.kernel_size), list(pe.proj.stride), list(pe.proj.padding)],
        "patch_bias": pe.proj.bias is not None,
        "patch_norm": _is_ln(getattr(pe, "norm", None)),
        "hybrid_stem": backbone is not None,
        "class_token": vit.cls_token is not None,
        "reg_tokens": 0 if vit.reg_token is None else vit.reg_token.shape[1],
        "pos_tokens": vit.pos_embed.shape[1],
        "no_embed_class": bool(vit.no_embed_class),
        "norm_pre": _is_ln(vit.norm_pre),
        "norm": _is_ln(vit.norm),
        "fc_norm": _is_ln(vit.fc_norm),
        "pool_include_prefix": bool(vit.pool_include_prefix),
        "qkv_bias": blk0.attn.qkv.bias is not None,
        "qk_norm": _is_ln(blk0.attn.q_norm),
        "layer_scale": hasattr(blk0.ls1, "gamma"),
        "act": _act_name(blk0.mlp.act),
    }
    return manifest


def _copy_ln(dst, src, c: int) -> None:
    """The first ``c`` channels of the LayerNorm ``src`` into ``dst`` (where ``dst`` is one)."""
    if _is_ln(dst):
        dst.weight.copy_(src.weight[:c])
        dst.bias.copy_(src.bias[:c])


def _copy_embedding(out: StaticViT, vit, w0: int) -> None:
    """The patch embedding, prefix tokens and position embedding at ``w0`` channels."""
    pe = vit.patch_embed
    out.patch.weight.copy_(pe.proj.weight[:w0])
    if pe.proj.bias is not None:
        out.patch.bias.copy_(pe.proj.bias[:w0])
    _copy_ln(out.patch_norm, getattr(pe, "norm", None), w0)
    if out.cls_token is not None:
        out.cls_token.copy_(vit.cls_token[..., :w0])
    if out.reg_token is not None:
        out.reg_token.copy_(vit.reg_token[..., :w0])
    out.pos_embed.copy_(vit.pos_embed[..., :w0])
    _copy_ln(out.norm_pre, vit.norm_pre, w0)


def _copy_block(dst, src, c: int, h: int, hidden: int, arch) -> None:
    """Block ``src`` sliced to ``c`` channels, ``h`` heads and ``hidden`` MLP units into ``dst``."""
    hd, h_all = arch.head_dim, arch.num_heads
    a = h * hd
    _copy_ln(dst.norm1, src.norm1, c)
    _copy_ln(dst.norm2, src.norm2, c)
    dst.qkv.weight.copy_(src.attn.qkv.weight.view(3, h_all * hd, -1)[:, :a, :c].reshape(3 * a, c))
    if src.attn.qkv.bias is not None:
        dst.qkv.bias.copy_(src.attn.qkv.bias.view(3, h_all * hd)[:, :a].reshape(3 * a))
    _copy_ln(dst.q_norm, src.attn.q_norm, hd)
    _copy_ln(dst.k_norm, src.attn.k_norm, hd)
    dst.proj.weight.copy_(src.attn.proj.weight[:c, :a])
    dst.proj.bias.copy_(src.attn.proj.bias[:c])
    dst.fc1.weight.copy_(src.mlp.fc1.weight[:hidden, :c])
    dst.fc1.bias.copy_(src.mlp.fc1.bias[:hidden])
    dst.fc2.weight.copy_(src.mlp.fc2.weight[:c, :hidden])
    dst.fc2.bias.copy_(src.mlp.fc2.bias[:c])
    if dst.gamma1 is not None:
        dst.gamma1.copy_(src.ls1.gamma[:c])
        dst.gamma2.copy_(src.ls2.gamma[:c])


def save(module: StaticViT, folder: str | Path) -> Path:
    """``folder/model.safetensors`` + ``folder/manifest.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / MANIFEST).write_text(json.dumps(module.manifest, indent=2) + "\n")
    return folder


COMPILE_KEY = "torch_compile"  # in the manifest: the torch.compile backend the export checked the module with


def compiled(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``module`` under ``torch.compile``, as one graph (``fullgraph``: a graph break is an
    error here, not a silent fall back to eager). It compiles on its first call, and once
    more for the first batch of another size (the batch dimension is then dynamic)."""
    return torch.compile(module.eval(), fullgraph=True, backend=backend)


def set_compile(folder: str | Path, backend: str | None) -> None:
    """Record in ``folder``'s manifest the torch.compile backend :func:`load` compiles the
    module with by default (None: eager)."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest[COMPILE_KEY] = backend
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def load(folder: str | Path, compile: bool | str | None = None) -> nn.Module:
    """The module :func:`save` wrote (no pickle: JSON and safetensors). A hybrid ViT's
    convolutional stem is rebuilt from the manifest's model name, then loaded. ``compile``:
    the module under :func:`compiled` with that backend (True: inductor), eager (False),
    or what the export recorded (None: compiled as ``prance export --compile`` checked it)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise PranceError(f"{folder} is not an exported static configuration (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise PranceError(f"{path} is not a {FORMAT} manifest")
    stem = None
    if manifest["hybrid_stem"]:
        from prance.models.zoo import create_vit

        stem = create_vit(manifest["model"], **manifest["model_kwargs"]).patch_embed.backbone
    module = StaticViT(manifest, stem)
    module.load_state_dict(load_file(str(folder / WEIGHTS)))
    backend = manifest.get(COMPILE_KEY) if compile is None else ("inductor" if compile is True else compile)
    return compiled(module, backend) if backend else module.eval()


def parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.state_dict().values())
