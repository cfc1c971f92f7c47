"""prance's registered models keep the contracts timm's own model tests check on every timm
model (forward, backward, default cfgs, features, FX; pytorch-image-models'
tests/test_models.py, which the wheel does not install), plus the shipped weights found by
name through their pretrained cfgs. ViTs are "non-standard" models there: features are tokens
(B, N, C) and the feature extractor is timm's ``getter`` over ``forward_intermediates``."""

import fnmatch
import math
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from prance.checkpoint import load_checkpoint, locate, read_header
from prance.errors import PranceError
from prance.models import zoo

MODELS = timm.list_models("prance_*")
TAGGED = timm.list_models("prance_*", include_tags=True)  # every pretrained cfg, as timm's cfg test walks them
SHIPPED = timm.list_pretrained("prance_*")
ROOT = Path(__file__).resolve().parent.parent


def _input(model: torch.nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *model.default_cfg["input_size"], generator=torch.Generator().manual_seed(0))


def test_prance_registers_its_models_and_shipped_weights():
    assert MODELS == ["prance_vit_fmnist", "prance_vit_micro"]
    assert SHIPPED == ["prance_vit_fmnist.base", "prance_vit_fmnist.supernet"]
    assert timm.get_pretrained_cfg("prance_vit_fmnist").tag == "supernet"  # the default tag: the default meta-network


@pytest.mark.parametrize("name", MODELS)
def test_forward(name):
    model = timm.create_model(name).eval()
    x = _input(model, 1)
    out = model(x)
    assert out.shape == (1, model.num_classes) and not out.isnan().any()
    model.set_grad_checkpointing()
    assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(model, 2))
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", TAGGED)
def test_default_cfg_matches_the_model(name):
    model = timm.create_model(name).eval()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and cfg["architecture"] == name.split(".")[0]
    assert model.num_classes == cfg["num_classes"] == 10 and model.num_features > 0 and model.head_hidden_size > 0
    assert cfg["input_size"] == (model.patch_embed.in_chans if hasattr(model.patch_embed, "in_chans") else 1, *model.patch_embed.img_size)
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert state[f"{cfg['first_conv']}.weight"].shape[1] == cfg["input_size"][0]  # the first conv reads the image
    x = _input(model, 1)
    tokens = model.forward_features(x)
    pre = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape[-1] == model.num_features and pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    headless = timm.create_model(name, num_classes=0).eval()
    assert headless(x).shape == (1, headless.num_features)
    data = timm.data.resolve_model_data_config(model)
    assert (data["mean"], data["std"], data["input_size"]) == (cfg["mean"], cfg["std"], cfg["input_size"])


def _check_feature_maps(outputs, channels, reductions, size):
    assert len(outputs) == len(channels) == len(reductions)
    for o, c, r in zip(outputs, channels, reductions):
        assert o.shape[:2] == (1, c) and o.ndim == 4 and not o.isnan().any()
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("extra", [{}, {"feature_cls": "getter"}, {"out_indices": (0, 1)}])
def test_features_only(name, extra):
    model = timm.create_model(name, features_only=True, **extra).eval()
    x = _input(model, 1)
    info = model.feature_info
    _check_feature_maps(model(x), info.channels(), info.reduction(), x.shape[-2:])
    assert len(info.channels()) == (2 if "out_indices" in extra else 3)  # timm's ViT default: the last 3 blocks


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = _input(model, 1)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) == len(model.blocks) >= 3
    final, maps = model.forward_intermediates(x, output_fmt="NCHW")
    _check_feature_maps(maps, info.channels(), info.reduction(), x.shape[-2:])
    assert torch.allclose(final, model.forward_features(x))


def _fx(model: torch.nn.Module) -> torch.nn.Module:
    """The whole model traced with torch.fx (torchvision's feature extractor, timm's leaf
    modules and functions), returning its last node, in train and in eval mode."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_is_the_model(name):
    model = timm.create_model(name).eval()
    x = _input(model, 1)
    with torch.inference_mode():
        out = model(x)
        traced = torch.cat(tuple(_fx(model)(x).values()))
    assert torch.equal(traced, out)


@pytest.mark.parametrize("name", MODELS)
def test_fx_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    x = _input(model, 2)
    model = _fx(model)
    out = torch.cat(tuple(model(x).values()))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("tag", SHIPPED)
def test_pretrained_loads_the_shipped_file(tag):
    file = zoo.shipped_checkpoint(tag)
    shipped = load_file(str(file))
    model = timm.create_model(tag, pretrained=True)
    state = model.state_dict()
    assert set(state) == set(shipped)  # the state-dict keys of the shipped checkpoints, unchanged
    assert all(torch.equal(state[k], shipped[k].to(state[k].dtype)) for k in state)
    meta, header = load_checkpoint(f"timm:{tag}")  # the meta-network by name: the same weights and the file's header
    assert header == read_header(file) and header["model"] == tag.split(".")[0]
    assert all(torch.equal(v, state[k]) for k, v in meta.vit.state_dict().items())
    assert locate(f"timm:{tag}") == str(file)
    # timm's pretrained tests: another head and the feature extractor load from the same weights
    five = timm.create_model(tag, pretrained=True, num_classes=5)
    assert five.head.out_features == 5 and torch.equal(five.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    features = timm.create_model(tag, pretrained=True, features_only=True)
    x = _input(model, 1)
    assert torch.allclose(features(x)[-1], model.forward_intermediates(x, indices=1, output_fmt="NCHW")[1][0])


def test_the_default_name_is_the_supernet_and_bad_names_are_one_line():
    assert zoo.shipped_checkpoint("prance_vit_fmnist") == zoo.shipped_checkpoint("prance_vit_fmnist.supernet")
    assert zoo.shipped_checkpoint("prance_vit_micro") is None and zoo.shipped_checkpoint("deit_tiny_patch16_224") is None
    with pytest.raises(PranceError, match=r"prance_vit_fmnist.nope: no such pretrained tag \(the tags of prance_vit_fmnist: base, supernet\)"):
        load_checkpoint("timm:prance_vit_fmnist.nope")
    with pytest.raises(PranceError, match="prance_vit_micro has no shipped weights"):
        timm.create_model("prance_vit_micro", pretrained=True)
    with pytest.raises(PranceError, match="is missing from this installation"):
        timm.create_model("prance_vit_fmnist", pretrained=True, pretrained_cfg_overlay={"file": "/nonexistent/x.safetensors"})


def test_shipped_files_are_package_data():
    """Every shipped file lies in the package (prance/checkpoints) and matches a package-data
    pattern of pyproject.toml, so a wheel carries it and finds it by name once installed."""
    folder = Path(str(resources.files("prance") / "checkpoints"))
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["prance"]
    for tag in SHIPPED:
        file = zoo.shipped_checkpoint(tag)
        assert file.parent == folder and file.is_file()
        for shipped in (file, file.with_suffix(".json")):  # the weights and their record
            assert any(fnmatch.fnmatch(f"checkpoints/{shipped.name}", p) for p in patterns), shipped.name
