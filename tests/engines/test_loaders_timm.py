"""timm parity: our loader on a timm ``VisionTransformer`` state dict, compared with timm's own forward.

timm 1.0 imports torchvision at module level (transforms, datasets, ``FrozenBatchNorm2d``) although a ViT forward
never uses it, and no torchvision build fits this CPU torch. The fixture below installs a stand-in
``torchvision`` *for this module only* (any attribute is an inert placeholder class) and removes it afterwards;
nothing of timm that we call touches it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import engines

TOL = 1e-4


class _Placeholder(type):
    def __getattr__(cls, name):  # e.g. InterpolationMode.BILINEAR
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so any submodule can be imported

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(attr, (), {})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


class _TorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _placeholder_module(spec.name)

    def exec_module(self, module):
        return None


@pytest.fixture(scope="module")
def timm():
    finder = _TorchvisionFinder()
    sys.meta_path.insert(0, finder)
    try:
        try:
            import timm as timm_module
        except Exception as exc:  # pragma: no cover - depends on the installed timm
            pytest.skip(f"timm cannot be imported even with a torchvision stand-in: {exc}")
        yield timm_module
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def test_timm_vit_state_dict_matches_timm_forward(timm, tmp_path, images, randomize):
    from timm.models.vision_transformer import VisionTransformer

    reference = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
        num_classes=5, global_pool="token",
    )
    randomize(reference, seed=4).eval()
    path = tmp_path / "timm_vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    (tmp_path / "timm_vit.json").write_text('{"num_attention_heads": 4, "layer_norm_eps": 1e-6}')
    encoder = engines.load(path)
    assert encoder.format == "timm" and not encoder.has_decoder
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(images), pre_logits=True)
    assert (encoder.embed(images) - features).abs().max() < TOL
