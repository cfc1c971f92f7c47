"""The meta-network: full sub-network == timm, first-k slicing == a smaller timm model
built from the sliced weights, reordering preserves the function, sub-network checks."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from prance.errors import PranceError
from prance.models import MetaViT, SubNet, create_meta, create_vit, reorder_by_importance




def _randomise(vit, seed=0):
    """Non-trivial weights everywhere (timm's init leaves biases and LayerNorms at 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vit


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("prance_vit_fmnist", {}),
        ("deit_tiny_patch16_224", {"img_size": 64}),
        ("prance_vit_micro", {"init_values": 0.1}),  # layer scale
        ("prance_vit_micro", {"global_pool": "avg", "fc_norm": True}),
        ("prance_vit_micro", {"reg_tokens": 2, "no_embed_class": True}),
        ("prance_vit_micro", {"qk_norm": True, "pre_norm": True}),
    ],
)
def test_full_subnet_equals_timm(name, kwargs, random_images):
    vit = _randomise(create_vit(name, **kwargs))
    meta = MetaViT(vit).eval()
    x = random_images(meta)
    with torch.no_grad():
        ref = vit(x)
        out = meta(x)
        out_explicit = meta(x, SubNet.full(meta.arch))
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(out, out_explicit)


def test_uniform_subnet_equals_smaller_timm_model_with_first_k_weights(random_images):
    meta = create_meta("prance_vit_micro", embed_dim=96, num_heads=4, depth=6)
    _randomise(meta.vit, seed=1)
    arch = meta.arch
    heads, embed, hidden = 3, 72, 192  # 3 heads of 24 channels fit a width-72 timm model
    small = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=embed, depth=arch.depth,
                              num_heads=heads, mlp_ratio=hidden / embed).eval()
    assert small.blocks[0].mlp.fc1.out_features == hidden
    big = meta.vit.state_dict()
    hd, h_all = arch.head_dim, arch.num_heads
    sliced = {}
    for k, v in small.state_dict().items():
        src = big[k]
        if k.endswith("attn.qkv.weight"):
            src = src.view(3, h_all * hd, -1)[:, : heads * hd, :embed].reshape(3 * heads * hd, embed)
        elif k.endswith("attn.qkv.bias"):
            src = src.view(3, h_all * hd)[:, : heads * hd].reshape(-1)
        else:
            src = src[tuple(slice(0, n) for n in v.shape)]
        sliced[k] = src.clone()
    small.load_state_dict(sliced)
    sub = SubNet((heads,) * arch.depth, (hidden,) * arch.depth, (embed,) * arch.depth)
    x = random_images(meta, n=4)
    with torch.no_grad():
        assert (meta(x, sub) - small(x)).abs().max().item() <= 1e-5


def test_stagewise_execution_matches_forward(random_images):
    meta = create_meta("prance_vit_fmnist")
    sub = meta.space.sample(torch.Generator().manual_seed(3))
    x = random_images(meta)
    with torch.no_grad():
        state = meta.embed(x, sub)
        for start, stop in [(0, 3), (3, 6), (6, 12)]:
            state = meta.run_blocks(state, sub, None, start, stop)
        assert torch.equal(meta.head(state), meta(x, sub))


@pytest.mark.parametrize("name,kwargs", [("prance_vit_fmnist", {}), ("prance_vit_micro", {"init_values": 0.1})])
def test_packed_block_computes_each_image_as_alone(name, kwargs, random_images):
    """A padded batch (tokens of size 0 after each image's own): the packed block gives
    every image's real tokens what the image gives alone, whatever its padding holds."""
    from prance.models import engine
    from prance.tokens.state import TokenState

    meta = _randomise(create_meta(name, **kwargs)).eval()
    x = random_images(meta, 3)
    own = [meta.vit.patch_embed.num_patches + 1, 11, 6]  # tokens of each image
    blk, heads, hidden, width = meta.vit.blocks[1], meta.space.heads[-1], meta.space.mlp[0], meta.space.embed[-1]
    with torch.no_grad():
        tokens = engine.embed(meta.vit, x, width)
        size = torch.zeros(3, tokens.shape[1], 1)
        padded = tokens.clone()
        for i, n in enumerate(own):
            size[i, :n] = 1
            padded[i, n:] = 7.0  # junk in the padding must not leak
        out = engine.block(blk, TokenState(padded, size, 1), heads, hidden, width, None, prop_attn=True, pack=True)
        for i, n in enumerate(own):
            alone = engine.block(blk, TokenState(tokens[i : i + 1, :n], None, 1), heads, hidden, width, None, prop_attn=True)
            torch.testing.assert_close(out.x[i, :n], alone.x[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.size, size)


def test_reorder_preserves_function_and_sorts_importance(random_images):
    from prance.models.reorder import embed_importance, head_importance, mlp_importance

    meta = create_meta("prance_vit_fmnist")
    _randomise(meta.vit, seed=2)
    x = random_images(meta)
    with torch.no_grad():
        before = meta(x)
        reorder_by_importance(meta.vit)
        after = meta(x)
    assert (before - after).abs().max().item() <= 1e-5
    for blk in meta.vit.blocks:
        for imp in (head_importance(blk), mlp_importance(blk)):
            assert torch.all(imp[:-1] >= imp[1:] - 1e-6)
    e = embed_importance(meta.vit)
    assert torch.all(e[:-1] >= e[1:] - 1e-4)


def test_sliced_forward_trains_the_shared_weights(random_images):
    meta = create_meta("prance_vit_micro").train()
    smallest = meta.space.smallest()
    meta(random_images(meta), smallest).sum().backward()
    qkv = meta.vit.blocks[0].attn.qkv.weight.grad
    h, hd, e = smallest.heads[0], meta.arch.head_dim, smallest.embed[0]
    assert qkv[: h * hd, :e].abs().sum() > 0  # active slice receives gradient
    assert qkv[: h * hd, e:].abs().sum() == 0  # inactive embedding columns do not
    assert qkv[h * hd : meta.arch.num_heads * hd].abs().sum() == 0  # inactive query heads do not


def test_space_sampling_and_subnet_checks():
    meta = create_meta("prance_vit_fmnist")
    space, arch = meta.space, meta.arch
    g = torch.Generator().manual_seed(0)
    subs = [space.sample(g) for _ in range(20)]
    assert len(set(subs)) > 1
    for s in subs:
        s.check(arch)
        assert set(s.heads) <= set(space.heads) and set(s.mlp) <= set(space.mlp)
        for st, start in enumerate(space.stage_starts):  # embed is constant within a stage
            stop = space.stage_starts[st + 1] if st + 1 < len(space.stage_starts) else arch.depth
            assert len(set(s.embed[start:stop])) == 1
    assert space.largest() == SubNet.full(arch)
    with pytest.raises(PranceError, match="heads value 99 outside"):
        SubNet((99,) * 12, (10,) * 12, (10,) * 12).check(arch)
    with pytest.raises(PranceError, match="heads has 3 entries, the model has 12 blocks"):
        SubNet((1,) * 3, (10,) * 3, (10,) * 3).check(arch)
    assert SubNet.from_dict(subs[0].to_dict()) == subs[0]


def test_unsupported_models_are_refused_clearly():
    with pytest.raises(PranceError, match="unsupported"):
        create_vit("deit_tiny_distilled_patch16_224", img_size=32)
    with pytest.raises(PranceError, match="unknown model"):
        create_vit("not_a_model")
    with pytest.raises(PranceError, match="prance_vit_micro has no shipped weights"):
        create_vit("prance_vit_micro", pretrained=True)
