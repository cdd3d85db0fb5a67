import pytest
import torch
import torch.fx
from torch import nn

from prunekit.zoo import resnet_small, small_cnn, unet


def _check_traced(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    return y


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("batchnorm", [True, False])
def test_unet_shapes_and_trace(upsampling, batchnorm):
    model = unet(in_channels=3, num_classes=4, width=4, depth=3, upsampling=upsampling, batchnorm=batchnorm)
    y = _check_traced(model, torch.randn(2, 3, 32, 40))
    assert y.shape == (2, 4, 32, 40)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == batchnorm
    kinds = {type(m) for m in model.modules()}
    if upsampling == "transpose":
        assert nn.ConvTranspose2d in kinds and nn.Upsample not in kinds
    else:
        assert nn.Upsample in kinds and nn.ConvTranspose2d not in kinds


def test_unet_structure_and_widths():
    model = unet(in_channels=1, num_classes=3, width=8, depth=4)
    names = [n for n, _ in model.named_children()]
    for i in range(1, 5):
        assert f"enc{i}" in names and f"dec{i}" in names and f"up{i}" in names
    assert "bottleneck" in names
    assert isinstance(model.out, nn.Conv2d) and model.out.kernel_size == (1, 1) and model.out.out_channels == 3
    enc_convs = [m for m in model.enc3.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in enc_convs] == [32, 32]
    bott = [m for m in model.bottleneck.modules() if isinstance(m, nn.Conv2d)]
    assert bott[-1].out_channels == 128
    # decoder sees the skip concatenated with the upsampled tensor
    dec1 = [m for m in model.dec1.modules() if isinstance(m, nn.Conv2d)]
    assert dec1[0].in_channels == 16
    # a cat on the channel dim, skip first
    gm = torch.fx.symbolic_trace(model)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 4
    for node in cats:
        assert node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None) == 1
        skip, _up = node.args[0]
        assert str(skip.target).startswith("enc")


def test_unet_default_and_odd_depth():
    model = unet()
    y = _check_traced(model, torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 2, 32, 32)
    y = _check_traced(unet(depth=1, width=2), torch.randn(1, 3, 6, 10))
    assert y.shape == (1, 2, 6, 10)


def test_unet_bad_args():
    with pytest.raises(ValueError):
        unet(upsampling="nearest")
    with pytest.raises(ValueError):
        unet(depth=0)
    with pytest.raises(ValueError, match="at most 8192, not 4503599627370496"):
        unet(width=4, depth=50)  # refused before any weight is allocated (it would be petabytes)


def test_resnet_small():
    model = resnet_small(in_channels=3, num_classes=7, width=8)
    y = _check_traced(model, torch.randn(3, 3, 32, 32))
    assert y.shape == (3, 7)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 32
    downsamples = [m for n, m in model.named_modules() if n.endswith("downsample") and isinstance(m, nn.Sequential)]
    assert len(downsamples) == 2  # layer2.0 and layer3.0
    for ds in downsamples:
        assert ds[0].kernel_size == (1, 1) and ds[0].stride == (2, 2) and isinstance(ds[1], nn.BatchNorm2d)
    gm = torch.fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 6
    # any input size works thanks to the adaptive pool
    assert _check_traced(model, torch.randn(1, 3, 20, 24)).shape == (1, 7)


def test_small_cnn():
    model = small_cnn()
    y = _check_traced(model, torch.randn(4, 1, 28, 28))
    assert y.shape == (4, 10)
    assert model.fc1.out_features == 64
    assert _check_traced(small_cnn(in_channels=3, num_classes=5, width=4), torch.randn(2, 3, 40, 32)).shape == (2, 5)


def test_builders_resolve_by_name():
    from prunekit.loading import load_model

    model = load_model(None, builder="prunekit.zoo:unet", kwargs={"width": 2, "depth": 2})
    assert isinstance(model, nn.Module) and not model.training
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 2, 16, 16)
    for name in ("resnet_small", "small_cnn"):
        assert isinstance(load_model(None, builder=f"prunekit.zoo:{name}"), nn.Module)
