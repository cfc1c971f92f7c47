"""The selector's merge actions at the first block of a stage (PRANCE) or spread over its
blocks (merge_spread, ToMe-like): the best static schedule of each action space at 25%
and 35% of dense, chosen on 2048 rollout images, scored on the validation and held-out
test images (docs/selector.md). Usage: .venv/bin/python scripts/experiments/merge_spread.py
"""
import torch, json
torch.set_num_threads(1)
from prance.checkpoint import load_checkpoint
from prance.selector.config import SelectorConfig
from prance.selector.selector import Selector
from prance.selector import static
from prance import splits
from prance.evaluate import evaluate
from prance.selector.train import batches
m,_=load_checkpoint("checkpoints/prance_vit_fmnist.safetensors"); m.eval()
cfg=SelectorConfig(train_limit=4096, val_limit=1000, test_limit=100000)
data=splits.load(m,splits.SplitSpec.of(cfg))
for b in (0.25,0.35):
  for strat in ("merge","prune_merge"):
    for spread in (False,True):
        sel=Selector.for_config(m,cfg.model_copy(update={"strategy":strat,"merge_spread":spread}))
        try: sel.check_budget(b*sel.full_gflops())
        except Exception as e: print(b,strat,spread,"unreachable"); continue
        r=static.best_schedule(m,sel,b*sel.full_gflops(),(data["train"][0][:2048],data["train"][1][:2048]))
        if r is None: print(b,strat,spread,"none"); continue
        v=evaluate(m,batches(*data["val"],256),r.best.subnet,r.best.plan,progress=False)
        t=evaluate(m,batches(*data["test"],256),r.best.subnet,r.best.plan,progress=False)
        print(json.dumps({"budget":b,"strategy":strat,"spread":spread,"n":r.candidates,"sched":r.best.describe(),"rollout":r.top1,"val":v["top1"],"test":t["top1"],"gflops":r.best.gflops}),flush=True)
