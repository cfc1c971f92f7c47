"""Where a computation runs: resolving a device name, mixed precision and timing
barriers, the same for evaluation, pretraining and the selector."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from prance.errors import PranceError


def resolve(name: str | torch.device) -> torch.device:
    """The torch device ``name`` names (``"auto"``: the first GPU when there is one);
    a PranceError when it is not available here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is not None and dev.type == "cpu":
        return dev
    ok = dev is not None and dev.type == "cuda" and torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    if not ok:
        raise PranceError(f"device {name!r} is not available here (use cpu, or cuda on a GPU machine)")
    return dev


def autocast_for(device: torch.device, amp: bool):
    """Mixed precision where asked: float16 on CUDA, bfloat16 on CPU; otherwise a no-op."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if amp and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timing barrier; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def of(module: torch.nn.Module) -> torch.device:
    """The device ``module``'s parameters are on (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
