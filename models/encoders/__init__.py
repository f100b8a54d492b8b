"""Frozen text and image encoders behind one interface, built by name.

Offline defaults: text "minilm" (all-MiniLM-L6-v2, 384-d), image "efficientnet_lite0" (1280-d).
"open_clip" (both towers) is optional and imported only when built. Heavy libraries (transformers,
open_clip) load inside the factories, so importing this package costs only torch.
"""
from __future__ import annotations

import importlib

from .base import EncoderError, ImageEncoder, TextEncoder, check_options

# (kind, name) -> (module, class): imported only when built, so open_clip stays optional.
_BACKENDS = {
    ("text", "minilm"): (".minilm", "MiniLMTextEncoder"),
    ("text", "open_clip"): (".clip", "OpenClipTextEncoder"),
    ("image", "efficientnet_lite0"): (".efficientnet", "EfficientNetLiteImageEncoder"),
    ("image", "open_clip"): (".clip", "OpenClipImageEncoder"),
}
TEXT_ENCODERS = tuple(n for k, n in _BACKENDS if k == "text")
IMAGE_ENCODERS = tuple(n for k, n in _BACKENDS if k == "image")
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


def _make(kind: str, name: str, opts: dict):
    names = TEXT_ENCODERS if kind == "text" else IMAGE_ENCODERS
    if name not in names:
        raise EncoderError(f"unknown {kind} encoder {name!r}; valid names are {list(names)}")
    module, cls_name = _BACKENDS[(kind, name)]
    cls = getattr(importlib.import_module(module, __name__), cls_name)
    check_options(kind, name, cls.__init__, opts)
    return cls(**opts)


def make_text_encoder(name: str, **opts) -> TextEncoder:
    """Build text encoder `name` (one of TEXT_ENCODERS) with backend options, e.g. max_seq_length, pretrained."""
    return _make("text", name, opts)


def make_image_encoder(name: str, **opts) -> ImageEncoder:
    """Build image encoder `name` (one of IMAGE_ENCODERS) with backend options, e.g. image_size, pretrained."""
    return _make("image", name, opts)
