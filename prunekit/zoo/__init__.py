"""Reference models, usable as builders: ``prunekit.zoo:unet``, ``prunekit.zoo:resnet_small``,
``prunekit.zoo:small_cnn``."""

from prunekit.zoo.cnn import SmallCNN, small_cnn
from prunekit.zoo.resnet import BasicBlock, ResNetSmall, resnet_small
from prunekit.zoo.unet import DoubleConv, UNet, Up, unet

__all__ = [
    "unet",
    "resnet_small",
    "small_cnn",
    "UNet",
    "DoubleConv",
    "Up",
    "ResNetSmall",
    "BasicBlock",
    "SmallCNN",
]
