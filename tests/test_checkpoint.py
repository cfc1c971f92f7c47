"""Tests of prance.checkpoint on real files: safetensors round trips, timm-style .pt state
dicts, and the refusals (malicious pickles, corrupt files, the wrong architecture)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prance.checkpoint import FORMAT, load_checkpoint, read_header, save_checkpoint
from prance.errors import PranceError
from prance.models import create_meta
from prance.models.meta import MetaViT
from prance.models.subnet import SubnetSpace

MICRO = "prance_vit_micro"

# A space that differs from SubnetSpace.default for the micro model (heads 1-2, MLP 64-128,
# embed 24-32, four stages): a loader that ignored the header and rebuilt the default
# space would fail the equality checks below.
MICRO_SPACE = SubnetSpace(heads=(1, 2), mlp=(32, 128), embed=(16, 32), stage_starts=(0, 2), depth=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and deterministically) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise(model: MetaViT, seed: int) -> MetaViT:
    """Overwrite every float tensor of the state dict (LayerNorm gains, biases and
    position embeddings included, which timm initialises to constants) with N(0, 0.5^2)
    noise, so that any mis-mapped or dropped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.vit.state_dict().values():
            if t.is_floating_point():
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def logits(model: MetaViT, x: torch.Tensor, subnet=None) -> torch.Tensor:
    return model(x, subnet)


@pytest.fixture
def micro() -> MetaViT:
    return randomise(MetaViT(create_meta(MICRO).vit, MICRO_SPACE), seed=0)


# ----------------------------------------------------------------- safetensors roundtrip


def test_roundtrip_gives_identical_logits_and_header(micro: MetaViT, tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "micro.safetensors"  # parent folder does not exist yet
    info = {"epoch": 7, "top1": 81.25, "note": "roundtrip"}
    assert save_checkpoint(path, micro, MICRO, info=info) == path

    loaded, header = load_checkpoint(path)

    x = images()
    full = logits(micro, x)
    assert torch.equal(logits(loaded, x), full)
    assert torch.equal(logits(loaded.vit, x), full)  # the plain timm forward agrees too

    subnet = micro.space.sample(torch.Generator().manual_seed(0))
    assert not subnet.is_full(micro.arch)  # a real sub-network, not the full model again
    sub = logits(micro, x, subnet)
    assert not torch.allclose(sub, full)
    assert torch.equal(logits(loaded, x, subnet), sub)

    assert header["format"] == FORMAT
    assert header["model"] == MICRO
    assert header["info"] == info
    assert header["model_kwargs"] == {}
    assert header["space"]["mlp"] == [32, 128] and header["space"]["stage_starts"] == [0, 2]
    assert loaded.space == MICRO_SPACE
    assert read_header(path) == header
    assert not loaded.training
    # written to a temporary name and renamed: nothing else is left in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["micro.safetensors"]


def test_float16_checkpoint_loads_back_within_half_precision(micro: MetaViT, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "half.safetensors", micro, MICRO, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert path.stat().st_size < 0.6 * save_checkpoint(tmp_path / "full.safetensors", micro, MICRO).stat().st_size

    loaded, _ = load_checkpoint(path)
    # The only loss is the float16 rounding of each weight: loaded weights are float32 again
    # and equal the float16-rounded originals exactly.
    for k, v in micro.vit.state_dict().items():
        w = loaded.vit.state_dict()[k]
        assert w.dtype == torch.float32
        assert torch.equal(w, v.half().float()), k

    # Rounding to float16 changes each weight by at most 2^-11 of its magnitude (11-bit
    # significand; our N(0, 0.25) weights stay far inside float16's range). Propagated through
    # 4 blocks of ~7 weight products each, a worst case of ~30 * 2^-11 ~ 1.5% of the logit
    # scale; typical errors are far smaller. 2% of the logit scale is a bound that a real
    # loading error (a wrong or missing tensor moves logits by O(100%)) cannot meet.
    x = images()
    ref = logits(micro, x)
    got = logits(loaded, x)
    assert not torch.equal(got, ref)  # the rounding is real...
    assert torch.allclose(got, ref, rtol=0, atol=0.02 * ref.abs().max().item())  # ...and small


def test_model_kwargs_rebuild_the_same_shape(tmp_path: Path) -> None:
    model = randomise(create_meta(MICRO, depth=2), seed=3)
    path = save_checkpoint(tmp_path / "shallow.safetensors", model, MICRO, model_kwargs={"depth": 2})

    loaded, header = load_checkpoint(path)
    assert header["model_kwargs"] == {"depth": 2}
    assert loaded.arch.depth == 2 and len(loaded.vit.blocks) == 2
    assert loaded.space == model.space and loaded.space.depth == 2
    assert {k: v.shape for k, v in loaded.vit.state_dict().items()} == {k: v.shape for k, v in model.vit.state_dict().items()}
    x = images()
    assert torch.equal(logits(loaded, x), logits(model, x))

    # kwargs given at load time override the header: depth 4 no longer fits the weights
    with pytest.raises(PranceError, match="does not fit model 'prance_vit_micro'.*missing"):
        load_checkpoint(path, depth=4)


# ------------------------------------------------------------------ .pt state dicts


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "deit_release"])
def test_pt_state_dict_loads_with_model_name(micro: MetaViT, tmp_path: Path, wrap: bool) -> None:
    sd = micro.vit.state_dict()
    path = tmp_path / "weights.pt"
    # the DeiT release wraps the weights: {"model": state_dict, ...} next to other entries
    torch.save({"model": sd, "epoch": 299} if wrap else sd, path)

    loaded, header = load_checkpoint(path, MICRO)
    assert header == {}
    assert loaded.space == SubnetSpace.default(loaded.arch)  # a bare state dict carries no space
    x = images()
    assert torch.equal(logits(loaded, x), logits(micro, x))

    with pytest.raises(PranceError, match="--model"):
        load_checkpoint(path)


def test_pt_with_vit_prefixed_keys_loads(micro: MetaViT, tmp_path: Path) -> None:
    """A MetaViT state dict (keys under ``vit.``) is accepted as well."""
    path = tmp_path / "meta.pth"
    torch.save(micro.state_dict(), path)
    assert all(k.startswith("vit.") for k in micro.state_dict())
    loaded, _ = load_checkpoint(path, MICRO)
    x = images()
    assert torch.equal(logits(loaded, x), logits(micro, x))


class _WritesMarker:
    """Unpickling this object opens (and so creates) the marker file: arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_it(micro: MetaViT, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": micro.vit.state_dict(), "payload": _WritesMarker(marker)}, path)

    with pytest.raises(PranceError, match="refusing to load .*which prance never unpickles"):
        load_checkpoint(path, MICRO)
    assert not marker.exists()

    # Control: the payload is live -- an unrestricted unpickle does create the marker.
    obj = torch.load(path, weights_only=False)
    obj["payload"].close()
    assert marker.exists()


def test_pt_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(PranceError, match="state dict of tensors"):
        load_checkpoint(path, MICRO)


# --------------------------------------------------------------- broken or wrong files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PranceError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(PranceError, match="not found"):
        load_checkpoint(tmp_path, MICRO)  # a folder is no checkpoint either


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(micro: MetaViT, tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path / "micro.safetensors", micro, MICRO)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xffnot safetensors" * 64, "empty": b""}[damage])
    with pytest.raises(PranceError, match="safetensors"):
        load_checkpoint(path)


def test_malformed_header_is_refused(tmp_path: Path) -> None:
    good = {k: v.contiguous() for k, v in create_meta(MICRO).vit.state_dict().items()}
    path = tmp_path / "bad_json.safetensors"
    save_file(good, str(path), metadata={"model": MICRO, "space": "{not json"})
    with pytest.raises(PranceError, match="malformed 'space'"):
        load_checkpoint(path)

    path = tmp_path / "bad_space.safetensors"
    save_file(good, str(path), metadata={"model": MICRO, "space": json.dumps({"heads": [1], "colour": "red"})})
    with pytest.raises(PranceError, match="malformed sub-network space"):
        load_checkpoint(path)


def test_other_architecture_is_refused_naming_the_mismatch(tmp_path: Path) -> None:
    fmnist = create_meta("prance_vit_fmnist")
    path = save_checkpoint(tmp_path / "fmnist.safetensors", fmnist, "prance_vit_fmnist")
    assert load_checkpoint(path)[0].arch.embed_dim == 96  # the file itself is fine

    with pytest.raises(PranceError) as err:
        load_checkpoint(path, MICRO)
    msg = str(err.value)
    assert "does not fit model 'prance_vit_micro'" in msg
    assert "wrong shape" in msg and "unexpected" in msg  # width 96 vs 32, 12 blocks vs 4
    assert "\n" not in msg  # one line for the CLI

    pt = tmp_path / "fmnist.pt"
    torch.save(fmnist.vit.state_dict(), pt)
    with pytest.raises(PranceError, match="does not fit model 'prance_vit_micro'.*wrong shape"):
        load_checkpoint(pt, MICRO)


def test_unknown_model_name_in_header(micro: MetaViT, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "x.safetensors", micro, "no_such_vit_model")
    with pytest.raises(PranceError, match="unknown model 'no_such_vit_model'"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, MICRO)  # the caller's name wins over the header's
    assert torch.equal(logits(loaded, images()), logits(micro, images()))


def test_training_state_round_trips_through_safetensors_without_pickle(tmp_path):
    """An AdamW state dict (int keys, scalar step tensors, param groups of mixed types) comes
    back equal from save_tensor_state; a truncated file or a foreign one is one PranceError."""
    from prance.checkpoint import load_tensor_state, save_tensor_state
    from prance.models import create_meta
    from prance.train.optim import adamw

    torch.manual_seed(0)
    model = create_meta("prance_vit_micro")
    opt = adamw(model, 1e-3, 0.05)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 3, "step": 120, "note": None, "pair": (1, 2.5)}
    path = save_tensor_state(tmp_path / "state.safetensors", state)
    assert not path.read_bytes().startswith(b"PK")  # not a torch.save zip (pickle inside)
    back = load_tensor_state(path)
    assert back["epoch"] == 3 and back["step"] == 120 and back["note"] is None and back["pair"] == (1, 2.5)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for pid, slots in state["optimizer"]["state"].items():
        assert all(torch.equal(v, back["optimizer"]["state"][pid][k]) for k, v in slots.items())
    fresh = adamw(create_meta("prance_vit_micro"), 1e-3, 0.05)
    fresh.load_state_dict(back["optimizer"])  # what a resumed worker does
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PranceError, match="corrupt or truncated"):
        load_tensor_state(path)
