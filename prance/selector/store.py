"""Selector checkpoints: safetensors weights with a JSON header naming the action space,
the network sizes, the training config and the meta-network they belong to (by a
fingerprint of its weights). Loading never unpickles anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from prance.errors import PranceError
from prance.models.meta import MetaViT
from prance.selector.actions import anchor_of
from prance.selector.selector import Selector, meta_fingerprint

SELECTOR_FILE = "selector.safetensors"  # the file name in run and trial folders
STATE_FILE = "selector_state.pt"  # the training state beside it (resume), prance.checkpoint.save_state
FORMAT = "prance-selector/2"  # 2: the actor has a per-stage prior (warm start from a static schedule)


def save_selector(path: str | Path, selector: Selector, config: dict | None = None, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "actions": selector.actions.signature(),
        "decision_blocks": [s for s, _ in selector.actions.stages[1:]],
        "hidden": selector.policy.hidden,
        "obs_dim": selector.policy.obs_dim,
        "meta_fingerprint": selector.fingerprint,
        "config": config or {},
        "extra": extra or {},
    }
    state = {k: v.detach().contiguous() for k, v in selector.policy.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"prance": json.dumps(header)})
    os.replace(tmp, path)


def read_selector_header(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"selector checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise PranceError(f"{path} is not a safetensors selector checkpoint ({e.__class__.__name__})") from None
    try:
        header = json.loads(meta.get("prance", "{}"))
    except json.JSONDecodeError:
        header = {}
    found = str(header.get("format", ""))
    if found.startswith("prance-selector/") and found != FORMAT:
        raise PranceError(f"{path} is a selector checkpoint of format {found}; this prance reads {FORMAT}: train it again")
    if found != FORMAT:
        raise PranceError(f"{path} is not a prance selector checkpoint")
    return header


def load_selector(path: str | Path, meta: MetaViT) -> tuple[Selector, dict]:
    """The selector saved at ``path``, for ``meta``; refuses one trained on another
    meta-network."""
    from safetensors.torch import load_file

    header = read_selector_header(path)
    found = meta_fingerprint(meta)
    if header["meta_fingerprint"] != found:
        raise PranceError(
            f"selector {path} was trained on another meta-network (fingerprint {header['meta_fingerprint']}, "
            f"this checkpoint's is {found}): pass the --checkpoint it was trained with"
        )
    strategy = header["actions"]["strategy"]
    selector = Selector.create(
        meta, strategy, header["decision_blocks"], hidden=header["hidden"], joint_widths=header["actions"].get("joint_widths", True), fingerprint=found,
        merge_spread=header["actions"].get("merge_spread", False), anchor=anchor_of(header["actions"].get("anchor")),
        budget_kind=(header.get("config") or {}).get("budget_kind", "cap"),  # selectors saved before budget kinds: cap
    )
    if selector.actions.signature() != header["actions"]:
        raise PranceError(f"selector {path}: its action space does not match this meta-network's sub-network space")
    selector.policy.load_state_dict(load_file(str(path)))
    selector.policy.eval()
    return selector, header


def check_training_folder(folder: str | Path) -> None:
    """A folder a selector run saved (the selector so far and its training state) can be
    continued from: both files there and readable to the last byte; PranceError naming
    the file when not (a checkpoint truncated by a full disk or a half-finished copy)."""
    from prance.checkpoint import load_state, verify_safetensors

    folder = Path(folder)
    for name in (SELECTOR_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise PranceError(f"{folder} holds no {name}")
    read_selector_header(folder / SELECTOR_FILE)
    verify_safetensors(folder / SELECTOR_FILE)
    load_state(folder / STATE_FILE)
