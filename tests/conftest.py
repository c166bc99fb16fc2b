import os

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# a small ViT on 28x28 grayscale, the shape the project works with on Fashion-MNIST
TINY_VIT = 'vit_tiny_patch16_224'
TINY_VIT_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, num_heads=3, depth=6)


@pytest.fixture(autouse=True, scope='session')
def _one_thread():
    """Tiny models: one intra-op thread is as fast and avoids oversubscribing busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit():
    import timm
    torch.manual_seed(0)
    return timm.create_model(TINY_VIT, **TINY_VIT_KWARGS).eval()
