"""Checkpoints: safetensors weights with the model's name, constructor arguments and
sub-network space in the header, so one file is enough to rebuild the meta-network.

Loading never unpickles code: safetensors files (recognised by content) are parsed by safetensors;
``.pt``/``.pth``/``.bin`` files (e.g. the DeiT release) go through
``torch.load(weights_only=True)``, which accepts only tensors and plain containers.
``timm:NAME`` names weights rather than a file: for a model prance ships weights for
(``timm:prance_vit_fmnist``, the default meta-network; ``timm:prance_vit_fmnist.base``) the
shipped checkpoint, found by name through the model's pretrained_cfg wherever the package is
installed (:func:`locate`); for any other timm model its pretrained weights, made a
meta-network the way ``sweeps/pretrain.py`` starts from them (channels reordered by importance).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from prance.errors import PranceError, first_line
from prance.models.meta import MetaViT
from prance.models.subnet import SubnetSpace
from prance.models.zoo import create_vit, shipped_checkpoint

FORMAT = "prance.meta_vit.v1"
TIMM_PREFIX = "timm:"  # a checkpoint "timm:deit_small_patch16_224": timm's pretrained weights, no pretraining run


def is_timm_source(path: str | Path) -> bool:
    """Whether ``path`` names timm's pretrained weights (``timm:NAME``) rather than a file."""
    return isinstance(path, str) and path.strip().lower().startswith(TIMM_PREFIX)


def _timm_name(spec: str) -> str:
    name = spec.strip()[len(TIMM_PREFIX):].strip()
    if not name:
        raise PranceError(f"checkpoint {spec!r} names no model: write timm:NAME, e.g. timm:deit_small_patch16_224")
    return name


def _shipped(source: str | Path) -> str | Path:
    """``source``, or for ``timm:NAME`` of a model prance ships weights for, that file."""
    if is_timm_source(source):
        shipped = shipped_checkpoint(_timm_name(str(source)))
        if shipped is not None:
            return shipped
    return source


def locate(source: str | Path) -> str:
    """Where the weights of a checkpoint ``source`` are: ``timm:NAME`` of a model prance ships
    weights for, that file (absolute); another ``timm:NAME`` unchanged (timm's download); a
    path made absolute (a relative one is relative to the working folder). For a checkpoint
    that is copied, or handed to a process that may run in another folder."""
    if is_timm_source(source):
        return str(_shipped(source)).strip()
    return str(Path(source).expanduser().resolve())


def _from_timm(spec: str, **model_kwargs) -> tuple[MetaViT, dict]:
    """``timm:NAME``: the meta-network around timm's pretrained NAME, channels sorted by
    importance (as pretraining with ``pretrained: true, reorder: true`` starts); the
    download needs internet (or timm's cache) on every node that loads it."""
    from prance.models import create_meta, reorder_by_importance

    name = _timm_name(spec)
    model = create_meta(name, pretrained=True, **model_kwargs)  # unknown name, failed download -> PranceError
    reorder_by_importance(model.vit)
    header = {"format": FORMAT, "model": name, "model_kwargs": dict(model_kwargs), "space": asdict(model.space),
              "info": {"source": f"{TIMM_PREFIX}{name}", "pretrained": True, "reorder": True}}
    return model.eval(), header


def save_checkpoint(
    path: str | Path,
    model: MetaViT,
    model_name: str,
    model_kwargs: dict | None = None,
    info: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights (optionally cast, e.g. to float16) and how to rebuild it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.vit.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    header = {
        "format": FORMAT,
        "model": model_name,
        "model_kwargs": json.dumps(model_kwargs or {}),
        "space": json.dumps(asdict(model.space)),
        "info": json.dumps(info or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def read_header(path: str | Path) -> dict:
    """The decoded header of a prance safetensors checkpoint (or of the shipped one a
    ``timm:NAME`` names)."""
    from safetensors import safe_open

    path = _shipped(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise PranceError(f"{path} is not a readable safetensors checkpoint ({type(e).__name__}: {e})") from None
    out = dict(meta)
    for key in ("model_kwargs", "space", "info"):
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                raise PranceError(f"{path} has a malformed {key!r} entry in its header (not JSON)") from None
    return out


def _is_safetensors(path: Path) -> bool:
    """By content, not by name: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unpickle_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to
    reload it with ``weights_only=False`` (advice never to follow for a file one did not make)."""
    import re

    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds the Python object {found.group(1)}, which prance never unpickles"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if found:
        return found.group(1).strip()[:160]
    if "weights_only" in text:  # torch's wording changes: keep only what does not advise
        return f"{type(e).__name__} from torch.load(weights_only=True)"
    return f"{type(e).__name__}: {first_line(e)}"


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        header = read_header(path)
        try:
            return load_file(str(path)), header
        except Exception as e:
            raise PranceError(f"{path} is a corrupt safetensors file ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PranceError(f"refusing to load {path}: not a plain tensor checkpoint ({_unpickle_reason(e)})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PranceError(f"{path} does not hold a state dict of tensors")
    return obj, {}


def load_checkpoint(path: str | Path, model_name: str | None = None, **model_kwargs) -> tuple[MetaViT, dict]:
    """Rebuild the meta-network saved at ``path``; returns (model in eval mode, header).

    For a bare state dict (a ``.pt`` file, or a safetensors file without our header)
    ``model_name`` says which timm model it belongs to. ``timm:NAME``: the checkpoint prance
    ships for NAME, else timm's pretrained weights of NAME, reordered (see :func:`locate`).
    """
    path = _shipped(path)
    if is_timm_source(path):
        return _from_timm(str(path), **model_kwargs)
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"checkpoint {path} not found")
    state, header = _read_state_dict(path)
    name = model_name or header.get("model")
    if not name:
        raise PranceError(f"{path} does not name its model: pass --model with the timm model name")
    kwargs = {**header.get("model_kwargs", {}), **model_kwargs}
    vit = create_vit(name, **kwargs)
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    model_state = vit.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    wrong = [k for k in model_state if k in state and state[k].shape != model_state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise PranceError(f"checkpoint {path} does not fit model {name!r}: {detail}")
    vit.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state.items()})
    try:
        space = SubnetSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in header["space"].items()}) if "space" in header else None
    except (AttributeError, TypeError) as e:
        raise PranceError(f"checkpoint {path} has a malformed sub-network space in its header ({e})") from None
    return MetaViT(vit, space).eval(), header


def save_state(path: str | Path, state: dict) -> Path:
    """Training state (optimiser states, counters, RNG states: tensors and plain
    containers only) written atomically, for :func:`load_state`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_state(path: str | Path) -> dict:
    """A training state saved by :func:`save_state`, through ``torch.load(weights_only=True)``;
    PranceError naming the file when it is missing, truncated or not plain data."""
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"training state {path} not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PranceError(f"{path} is a corrupt or truncated training state ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(obj, dict):
        raise PranceError(f"{path} is not a prance training state (a {type(obj).__name__}, not a dict)")
    return obj


def verify_safetensors(path: str | Path) -> None:
    """Read every tensor of a safetensors checkpoint; PranceError when it is truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"{path} not found")
    _read_state_dict(path)


STATE_FORMAT = "prance.state.v1"


def _flatten(obj, tensors: dict[str, torch.Tensor]):
    """A JSON skeleton of ``obj`` whose tensors are moved to ``tensors`` (named t0, t1, ...)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (int, str)) for k in obj):
            raise PranceError(f"training state: dict keys must be int or str, got {[type(k).__name__ for k in obj]}")
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise PranceError(f"training state: cannot store a {type(obj).__name__} (tensors, numbers, strings, lists, dicts only)")


def _unflatten(node, tensors: dict[str, torch.Tensor]):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__list__" in node:
            items = [_unflatten(v, tensors) for v in node["__list__"]]
            return tuple(items) if node.get("tuple") else items
    return node


def save_tensor_state(path: str | Path, state: dict) -> Path:
    """A training state (optimizer state dict, counters: tensors and plain containers) as
    safetensors: the tensors as tensors, the rest as JSON in the header. No pickle, so a
    resumable state can be kept anywhere, git included (:func:`load_tensor_state`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "state": json.dumps(skeleton)})
    tmp.replace(path)
    return path


def load_tensor_state(path: str | Path) -> dict:
    """The state :func:`save_tensor_state` wrote; PranceError naming the file when it is
    missing, truncated or not such a state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PranceError(f"training state {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        raise PranceError(f"{path} is a corrupt or truncated training state ({type(e).__name__}: {first_line(e)})") from None
    if meta.get("format") != STATE_FORMAT or "state" not in meta:
        raise PranceError(f"{path} is not a prance training state (format {meta.get('format')!r})")
    state = _unflatten(json.loads(meta["state"]), tensors)
    if not isinstance(state, dict):
        raise PranceError(f"{path} is not a prance training state (a {type(state).__name__}, not a dict)")
    return state
