"""Starting Ray the same way everywhere prance does (the sweep's driver, pretraining).

Ray >= 2.59 turns token authentication on for a local cluster it starts and says so in
a WARNING line on stderr when ``RAY_AUTH_MODE`` is unset. prance keeps authentication
on, but says so explicitly, so that the line does not come before prance's own output
(and before a one-line error). A cluster one joins keeps whatever mode its user set.
"""

from __future__ import annotations

import os


def starts_local_cluster(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a new local Ray rather than joining one."""
    target = address or os.environ.get("RAY_ADDRESS") or ""
    return target in ("", "local")


def init_ray(address: str | None = None, **kwargs) -> None:
    """``ray.init`` (no-op when Ray is up), token authentication explicit for a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if starts_local_cluster(address):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # what Ray chooses anyway, without its warning line
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)
