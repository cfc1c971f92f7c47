import pytest
import torch


@pytest.fixture
def random_images():
    """``random_images(model, n, seed)``: a seeded batch shaped for a MetaViT's input."""

    def make(model, n=3, seed=0):
        pe = model.vit.patch_embed
        return torch.randn(n, model.vit.in_chans, *pe.img_size, generator=torch.Generator().manual_seed(seed))

    return make
