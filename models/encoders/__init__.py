"""Frozen text and image encoders behind one interface, built by name.

Offline defaults: text "minilm" (all-MiniLM-L6-v2, 384-d), image "efficientnet_lite0" (1280-d).
"open_clip" (both towers) is optional and imported only when built. Heavy libraries (transformers,
open_clip) load inside the factories, so importing this package costs only torch.
"""
from __future__ import annotations

from .base import EncoderError, ImageEncoder, TextEncoder, check_options

TEXT_ENCODERS = ("minilm", "open_clip")
IMAGE_ENCODERS = ("efficientnet_lite0", "open_clip")
DEFAULT_TEXT_ENCODER = "minilm"
DEFAULT_IMAGE_ENCODER = "efficientnet_lite0"

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "DEFAULT_TEXT_ENCODER",
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "EncoderError",
    "ImageEncoder",
    "TextEncoder",
    "make_image_encoder",
    "make_text_encoder",
]


def _text_class(name: str):
    if name == "minilm":
        from .minilm import MiniLMTextEncoder

        return MiniLMTextEncoder
    from .clip import OpenClipTextEncoder

    return OpenClipTextEncoder


def _image_class(name: str):
    if name == "efficientnet_lite0":
        from .efficientnet import EfficientNetLiteImageEncoder

        return EfficientNetLiteImageEncoder
    from .clip import OpenClipImageEncoder

    return OpenClipImageEncoder


def make_text_encoder(name: str, **opts) -> TextEncoder:
    """Build text encoder `name` (one of TEXT_ENCODERS) with backend options, e.g. max_seq_length, pretrained."""
    if name not in TEXT_ENCODERS:
        raise EncoderError(f"unknown text encoder {name!r}; valid names are {list(TEXT_ENCODERS)}")
    cls = _text_class(name)
    check_options("text", name, cls.__init__, opts)
    return cls(**opts)


def make_image_encoder(name: str, **opts) -> ImageEncoder:
    """Build image encoder `name` (one of IMAGE_ENCODERS) with backend options, e.g. image_size, pretrained."""
    if name not in IMAGE_ENCODERS:
        raise EncoderError(f"unknown image encoder {name!r}; valid names are {list(IMAGE_ENCODERS)}")
    cls = _image_class(name)
    check_options("image", name, cls.__init__, opts)
    return cls(**opts)
