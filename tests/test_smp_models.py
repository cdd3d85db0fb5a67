"""segmentation_models_pytorch: every architecture with three encoders, the same check as timm's and
MONAI's (``test_real_models.check``): graph, half the units cut, train and eval runs, FLOPs against
fvcore, exactness in float64.

These are the models the first prunekit could not even report (their forwards check input sizes);
random weights (``encoder_weights=None``), 64x64 inputs (PAN's pyramid pooling needs 128x128).
Slow, except one U-Net in the default run.
"""

from __future__ import annotations

import pytest
import torch

from test_real_models import check

smp = pytest.importorskip("segmentation_models_pytorch")

ARCHITECTURES = ["Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "PAN",
                 "UPerNet"]
ENCODERS = ["resnet18", "mobilenet_v2", "efficientnet-b0"]
# other encoder families: the transformer of SegFormer, timm's universal encoders, a dense encoder, a dual-path
# encoder that calls slices of its Sequential as modules
OTHERS = [("Segformer", "mit_b0"), ("Unet", "tu-resnet10t"), ("Unet", "timm-regnetx_002"), ("FPN", "densenet121"),
          ("Unet", "dpn68")]
CASES = [f"{arch}:{encoder}" for arch in ARCHITECTURES for encoder in ENCODERS] + [f"{a}:{e}" for a, e in OTHERS]
SIDE = {"PAN": 128}


def build(name: str):
    arch, encoder = name.split(":")
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2).eval()
    side = SIDE.get(arch, 64)
    return model, torch.randn(1, 3, side, side), torch.randn(2, 3, side, side)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_smp(name):
    assert check(name, build=build) == []  # no opaque leaves: every op is understood


def test_smp_smoke():
    assert check("Unet:resnet18", build=build) == []
