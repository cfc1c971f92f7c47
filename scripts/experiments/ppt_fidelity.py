"""What PPT's two fidelity fixes change on the shipped meta-network (docs/design.md).

Evaluates PPT (default r and threshold) on the full Fashion-MNIST test set three ways:
the reference formula with score-ordered pruning (what prance runs), the per-head score
sum_h a_h ||v_h|| prance used before, and the reference score with pruned tokens kept in
their original order. Prints Top-1 and the share of (image, layer) decisions that pool.
Usage: .venv/bin/python scripts/experiments/ppt_fidelity.py [--threshold T ...]
"""

import argparse
import json

import torch

import prance.tokens.ppt as ppt
from prance.checkpoint import load_checkpoint
from prance.data import build_dataset, input_spec_for_model, make_loader
from prance.models import engine
from prance.tokens import StrategyConfig, build_plan
from prance.tokens.prune import keep_top
from prance.tokens.state import V_NORM

SHIPPED = "checkpoints/prance_vit_fmnist.safetensors"


def run(model, loader, threshold, variant):
    reference_attention = engine.attention
    reference_keep = ppt.keep_top
    if variant == "per_head_norm":
        def attention(attn, x, heads, bias, needs):
            out, facts = reference_attention(attn, x, heads, bias, needs - {V_NORM})
            if V_NORM in needs:  # per-head norms, (B, heads, N)
                b_, n, c = x.shape
                hd, h_all = attn.head_dim, attn.num_heads
                w = attn.qkv.weight.view(3, h_all * hd, -1)[2, : heads * hd, :c]
                bv = None if attn.qkv.bias is None else attn.qkv.bias.view(3, h_all * hd)[2, : heads * hd]
                v = torch.nn.functional.linear(x, w, bv).view(b_, n, heads, hd).transpose(1, 2)
                a = facts["cls_attn"]  # (B, heads, N); the stored norm makes significance() compute sum_h a_h ||v_h||
                facts[V_NORM] = (a * v.norm(dim=-1)).sum(dim=1) / a.sum(dim=1)
            return out, facts
        engine.attention = attention
    if variant == "original_order":
        ppt.keep_top = lambda s, sc, k, by_score=False: reference_keep(s, sc, k, False)
    try:
        plan = build_plan(StrategyConfig("ppt", threshold=threshold), model.arch)
        correct = n = pooled = decisions = 0
        with torch.inference_mode():
            for x, y in loader:
                stats = {}
                correct += int((model(x, None, plan, stats=stats).argmax(-1) == y).sum())
                n += len(y)
                for p in stats.get("ppt_pool", []):
                    pooled += int(p.sum())
                    decisions += p.numel()
        return {"variant": variant, "threshold": threshold, "top1": 100 * correct / n, "pool_share": pooled / max(1, decisions), "images": n}
    finally:
        engine.attention, ppt.keep_top = reference_attention, reference_keep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, nargs="+", default=[7e-5])
    args = ap.parse_args()
    model, _ = load_checkpoint(SHIPPED)
    model.eval()
    ds = build_dataset("fashion-mnist", "test", input_spec_for_model(model.vit))
    loader = list(make_loader(ds, batch_size=500))
    for t in args.threshold:
        for variant in ("reference", "per_head_norm", "original_order"):
            print(json.dumps(run(model, loader, t, variant)), flush=True)


if __name__ == "__main__":
    main()
