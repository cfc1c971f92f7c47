"""Work the trials of a sweep share, through one small Ray actor per sweep (the *registry*,
:class:`SharedWork`, started by the driver and named in ``TrialContext.shared``).

- **Images, one copy per node.** The first trial that needs a part of the split asks the
  registry, which starts one Ray task (:func:`decode_part`) on that trial's node: it decodes
  the part once into uint8 arrays (:func:`prance.splits.load_images`, parallel loader
  workers) and returns them to Ray's object store. Every trial then ``ray.get``s the same
  object: numpy arrays in the object store are shared by the workers of a node without a
  copy (zero-copy deserialisation), and a trial on another node pulls one copy into its
  node's store. The registry owns the object, so it outlives the trial that asked first.
  Why not a memory-mapped file: the object store already is shared memory per node, spills
  to disk under pressure, moves objects between nodes and rebuilds a lost one from its
  task; a file would need a local path agreed per node and its own cleanup.
- **Values computed once per configuration** (the warm-start anchor search of a
  (strategy, budget) combo, the training-free baselines of a budget, a cascade ladder):
  :func:`value` keyed by :func:`key_of` (a hash of what determines the value). The first
  trial to ask claims the key and computes it on its own device, the others wait for it.
  A claimant that fails releases its claim; one that dies stops renewing it, and after
  :data:`EXPIRY_S` the next waiter takes over.

Outside a Ray sweep (no registry name) everything is computed in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
import warnings

EXPIRY_S = 120.0  # a claim not renewed for this long passes to the next trial that asks
BEAT_S = 10.0  # how often a claimant renews its claim
POLL_S = 0.2


def key_of(kind: str, *parts) -> str:
    """A key for the value of a configuration: its kind and a hash of the parts' ``repr``."""
    return f"{kind}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:32]}"


class SharedWork:
    """The registry (a Ray actor, :func:`start`): values by key, their claims, and the image
    objects it owns."""

    def __init__(self) -> None:
        self.values: dict = {}
        self.claims: dict = {}  # key -> [token, last renewal]
        self.refs: dict = {}  # key -> ObjectRef of a decoded part
        self.computed: dict = {}  # key -> how many values were put (1 when shared)

    async def claim(self, key: str, token: str) -> tuple[str, object]:
        """("done", value) once the value exists; ("compute", None) when this caller must
        compute it (no claim, or the claimant stopped renewing)."""
        while True:
            if key in self.values:
                return "done", self.values[key]
            held = self.claims.get(key)
            now = time.monotonic()
            if held is None or held[0] == token or now - held[1] > EXPIRY_S:
                self.claims[key] = [token, now]
                return "compute", None
            await asyncio.sleep(POLL_S)

    def renew(self, key: str, token: str) -> None:
        held = self.claims.get(key)
        if held is not None and held[0] == token:
            held[1] = time.monotonic()

    def release(self, key: str, token: str) -> None:
        held = self.claims.get(key)
        if held is not None and held[0] == token:
            del self.claims[key]

    def put(self, key: str, token: str, value) -> None:
        self.values.setdefault(key, value)
        self.computed[key] = self.computed.get(key, 0) + 1
        self.claims.pop(key, None)

    def images(self, key: str, spec, image_spec, part: str, node_id: str) -> list:
        """[ObjectRef] of the decoded ``part`` (its task started on ``node_id`` by the first caller)."""
        if key not in self.refs:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # 0 CPUs: the trial that asked waits for it, idle, on the same node
            task = _decode_task().options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True))
            self.refs[key] = task.remote(spec, image_spec, part)
            self.computed[key] = self.computed.get(key, 0) + 1
        return [self.refs[key]]

    def stats(self) -> dict:
        """How often each key was computed (tests check the sharing on it)."""
        return dict(self.computed)


def _decode_part(spec, image_spec, part: str) -> dict:
    from prance import splits

    x, y = splits.load_images(spec, image_spec, parts=(part,))[part]
    return {"x": x.numpy(), "y": y.numpy()}


_TASK: list = []


def _decode_task():
    """:func:`_decode_part` as a Ray task (made once per process)."""
    if not _TASK:
        import ray

        _TASK.append(ray.remote(_decode_part))
    return _TASK[0]


def start(name: str | None = None):
    """Start the sweep's registry (on the driver, after ``ray.init``); returns (handle, name).
    The handle must stay referenced while the trials run (the actor is the driver's)."""
    import ray

    name = name or f"prance-shared-{uuid.uuid4().hex[:12]}"
    return ray.remote(num_cpus=0)(SharedWork).options(name=name).remote(), name


def _registry(name: str):
    import ray

    return ray.get_actor(name)


def image_ref(name: str, spec, image_spec, part: str):
    """The ObjectRef of a decoded part of the split; the first caller's node decodes it."""
    import ray

    reg = _registry(name)
    [ref] = ray.get(reg.images.remote(key_of("images", spec, image_spec, part), spec, image_spec, part,
                                      ray.get_runtime_context().get_node_id()))
    return ref


def images(name: str, spec, image_spec, part: str):
    """A part of the split as (uint8 x, int64 y) tensors read from the node's shared copy
    in Ray's object store (read-only: nothing writes into images it is given)."""
    import ray
    import torch

    got = ray.get(image_ref(name, spec, image_spec, part))
    with warnings.catch_warnings():  # the arrays are read-only views of the object store
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(got["x"]), torch.from_numpy(got["y"])


def value(name: str, key: str, compute):
    """``compute()``, once per ``key`` across the sweep's trials (see the module docstring);
    in-process when ``name`` is empty."""
    if not name:
        return compute()
    import ray

    reg = _registry(name)
    token = uuid.uuid4().hex
    status, out = ray.get(reg.claim.remote(key, token))
    if status == "done":
        return out
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(BEAT_S):
            reg.renew.remote(key, token)

    beat = threading.Thread(target=renew, daemon=True)
    beat.start()
    try:
        out = compute()
    except BaseException:
        reg.release.remote(key, token)
        raise
    finally:
        stop.set()
    ray.get(reg.put.remote(key, token, out))
    return out
