"""The one configuration system: pydantic models loaded from YAML presets or files, plus
``key=value`` overrides.

Each configuration lives with the package it configures (``prance.train.config``,
``prance.selector.config``, ``prance.sweep.config``) and subclasses :class:`Strict`:
``extra="forbid"``, so a misspelt key is an error that names the key and the allowed
ones. Presets ship inside the package, as package data (``prance/presets/<kind>/<name>.yaml``,
read through :mod:`importlib.resources`), so an installed prance has them too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from prance.errors import PranceError

CONFIG_ROOT = resources.files("prance") / "presets"  # <kind>/<name>.yaml

T = TypeVar("T", bound=BaseModel)

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _model_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], str]:
    """The (nested) model that holds the last key of ``loc``, and the dotted key."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return model, ".".join(str(p) for p in loc)
    if typing.get_origin(current) is dict:
        current = typing.get_args(current)[1]
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        current = model
    return current, ".".join(str(p) for p in loc)


def _format_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(config)"
    if first["type"] == "extra_forbidden":
        holder, key = _model_at(model, loc)
        allowed = ", ".join(holder.model_fields)
        return f"{where}: unknown key {key!r}; allowed keys: {allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {key}: {msg}" if loc else f"{where}: {msg}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "token_strategies=[prune, merge]"]`` -> dict, values parsed as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PranceError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise PranceError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return out


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set ``overrides`` into ``data``; a dotted key (``selector.iterations``) reaches into
    nested mappings, creating them where missing."""
    for key, value in overrides.items():
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = target[part] = {}
            target = nxt
        target[parts[-1]] = value


def presets(kind: str) -> list[str]:
    """The preset names of ``kind`` (``pretrain``, ``sweep``)."""
    folder = CONFIG_ROOT / kind
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(model: type[T], kind: str, preset_or_path: str, overrides: dict[str, Any] | None = None,
                set_keys: Iterable[str] = ()) -> T:
    """A preset name (``prance/presets/<kind>/<name>.yaml``) or a YAML path, plus overrides.
    ``set_keys``: the overrides the user gave with ``--set``; a mistake in one of them is
    reported as ``--set KEY: ...``, not as the file's."""
    path: Any = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_ROOT / kind / f"{preset_or_path}.yaml"
        if not path.is_file():
            raise PranceError(f"unknown preset {preset_or_path!r}: choose from {', '.join(presets(kind))} or give a YAML path")
    elif not path.is_file():
        raise PranceError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PranceError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PranceError(f"{path} must hold a mapping of keys to values")
    _apply_overrides(data, overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        loc = ".".join(str(p) for p in e.errors()[0]["loc"])
        given = loc and any(k == loc or loc.startswith(f"{k}.") or k.startswith(f"{loc}.") for k in set_keys)
        text = _format_error(e, model, "--set" if given else str(path))
        raise PranceError(text.replace("--set: ", "--set ", 1) if given else text) from None


def validate(model: type[T], data: dict[str, Any], where: str) -> T:
    """``model`` from ``data``; a mistake is a :class:`PranceError` naming the key (and,
    for an unknown one, the allowed keys), prefixed by ``where``."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PranceError(_format_error(e, model, where)) from None
