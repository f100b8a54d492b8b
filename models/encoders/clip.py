"""Optional open_clip backend (the paper's CLIP encoders) for machines that have or can fetch the weights.

open_clip is imported only when one of these encoders is built: it imports torchvision, whose wheels on
CPU-only hosts are often CUDA builds that fail to import.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    EncoderError,
    batches,
    check_batch_size,
    check_paths,
    check_texts,
    load_rgb,
    torch_threads,
)

_INSTALL_HINT = (
    "install it with `pip install -c constraints.txt '.[clip]'` on a machine whose torchvision build "
    "matches torch (a CUDA torchvision next to CPU torch fails with 'operator torchvision::nms does not "
    "exist'), or use the offline encoders 'minilm' / 'efficientnet_lite0'"
)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def import_open_clip():
    """Import open_clip, or raise EncoderError saying how to install it."""
    try:
        import open_clip
    except Exception as e:  # ImportError, or RuntimeError from a mismatched torchvision
        why = f"{type(e).__name__}: {e}"
        raise EncoderError(f"the open_clip backend cannot be imported ({why}); {_INSTALL_HINT}") from e
    return open_clip


def _looks_like_path(pretrained: str) -> bool:
    """True when `pretrained` names a file rather than an open_clip tag such as 'openai'."""
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.startswith(("~", "."))
        or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    )


def _how_to_get_weights(model: str, tag: str) -> str:
    return (
        f"on a machine with internet run `python -c \"import open_clip; open_clip.create_model_and_transforms("
        f"'{model}', pretrained='{tag}')\"` and copy its Hugging Face cache (~/.cache/huggingface/hub) or "
        "~/.cache/clip here (or point cache_dir at the copy), or pass pretrained=<path to a local checkpoint file>"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cached_tag_weights(open_clip, model: str, tag: str, cache_dir: str | None) -> str | None:
    """Local file open_clip would load for (model, tag), or None; mirrors open_clip.download_pretrained."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):  # open_clip prefers the hub copy whenever a tag has one
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = [filename or "open_clip_pytorch_model.bin"]
        if names[0].endswith(".bin"):  # open_clip first looks for a safetensors twin
            stem = "open_clip_model" if names[0] == "open_clip_pytorch_model.bin" else names[0][: -len(".bin")]
            names.insert(0, stem + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    if cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(eq=False)
class _Loaded:
    """One loaded open_clip model with its eval preprocessing and tokenizer, shared by both towers."""

    model: Any
    preprocess: Any
    tokenizer: Any
    weights_id: str
    embed_dim: int


# Text and image encoders built from the same weights share one model while either is alive.
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def load_open_clip(model: str, pretrained: str | None, cache_dir: str | None, device: str, seed: int) -> _Loaded:
    """Load (model, pretrained) once per process; fails in seconds when the weights are not on this machine."""
    if pretrained is not None and not isinstance(pretrained, str):
        raise EncoderError(f"pretrained must be a tag, a checkpoint path or None, got {pretrained!r}")
    # Cheap checks first, before the slow (and possibly broken) open_clip import.
    ckpt = None
    if pretrained is not None and _looks_like_path(pretrained):
        ckpt = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(ckpt):
            raise EncoderError(
                f"open_clip checkpoint {pretrained!r} does not exist (resolved to {ckpt}); "
                + _how_to_get_weights(model, "openai")
            )
    key = (model, ckpt or pretrained, cache_dir, str(device), seed if pretrained is None else None)
    hit = _LOADED.get(key)
    if hit is not None:
        return hit

    open_clip = import_open_clip()
    if model not in open_clip.list_models():
        near = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        raise EncoderError(f"unknown open_clip model {model!r}; close matches: {near} (see open_clip.list_models())")
    if ckpt is not None:
        source, weights_id = ckpt, f"ckpt-sha256-{_sha256_file(ckpt)[:16]}"
    elif pretrained is not None:
        if not open_clip.get_pretrained_cfg(model, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise EncoderError(
                f"open_clip has no pretrained tag {pretrained!r} for {model!r}; known tags: {tags}, "
                "or pass pretrained=<path to a local checkpoint file>"
            )
        if _offline() and _cached_tag_weights(open_clip, model, pretrained, cache_dir) is None:
            raise EncoderError(
                f"weights for open_clip {model!r} pretrained={pretrained!r} are not in the local cache and "
                "this process is offline (HF_HUB_OFFLINE=1); " + _how_to_get_weights(model, pretrained)
            )
        source, weights_id = pretrained, pretrained
    else:
        source, weights_id = None, f"random-init-seed{seed}"

    kwargs = dict(pretrained=source, device=device, cache_dir=cache_dir)
    params = inspect.signature(open_clip.create_model_and_transforms).parameters
    # OpenAI weights were trained with QuickGELU; open_clip only warns when the model config (e.g. plain
    # "ViT-B-32") disagrees with the tag, and the features come out wrong. Follow the tag.
    if ckpt is None and pretrained is not None and "force_quick_gelu" in params:
        kwargs["force_quick_gelu"] = bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    # Random init must stay offline too: don't fetch pretrained HF text towers / timm trunks.
    for flag in ("pretrained_text", "pretrained_hf", "pretrained_image"):
        if flag in params:
            kwargs[flag] = False
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init is reproducible, so its id is stable
            net, _, preprocess = open_clip.create_model_and_transforms(model, **kwargs)
        tok_params = inspect.signature(open_clip.get_tokenizer).parameters
        tokenizer = open_clip.get_tokenizer(model, **({"cache_dir": cache_dir} if "cache_dir" in tok_params else {}))
    except Exception as e:
        raise EncoderError(
            f"open_clip could not build {model!r} with pretrained={pretrained!r} ({type(e).__name__}: {e}); "
            + _how_to_get_weights(model, pretrained or "openai")
        ) from e
    cfg = open_clip.get_model_config(model) or {}
    loaded = _Loaded(net.eval(), preprocess, tokenizer, weights_id, int(cfg.get("embed_dim", 0)))
    _LOADED[key] = loaded
    return loaded


class _OpenClipBase:
    def __init__(
        self,
        tower: str,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        normalize: bool = True,
        cache_dir: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        num_threads: int | None = None,
    ):
        self._oc = load_open_clip(model, pretrained, cache_dir, device, seed)
        self.device = torch.device(device)
        self.normalize = normalize
        self.num_threads = num_threads
        self.id = f"open_clip/{tower}/{model}/{self._oc.weights_id}/{'l2' if normalize else 'raw'}"
        self.dim = self._oc.embed_dim or self._probe_dim()

    def _probe_dim(self) -> int:
        raise NotImplementedError

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        # CLIP scores are cosines (Radford et al. 2021, section 2.3); unit vectors make that a dot product.
        return (F.normalize(z, dim=-1) if self.normalize else z).cpu()


class OpenClipTextEncoder(_OpenClipBase):
    """CLIP text tower via open_clip (default ViT-B-32 'openai'); L2-normalised unless normalize=False."""

    # A checkpoint path carries no QuickGELU flag: for OpenAI checkpoints name the model "ViT-B-32-quickgelu".

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", normalize: bool = True,
                 cache_dir: str | None = None, device: str = "cpu", seed: int = 0, num_threads: int | None = None):
        """Load the model (tag from the local cache, a checkpoint path, or None for a seeded random init)."""
        super().__init__("text", model, pretrained, normalize, cache_dir, device, seed, num_threads)

    def _probe_dim(self) -> int:
        return int(self.encode(["probe"]).shape[1])

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed texts as float32 [n, dim]."""
        texts = check_texts(texts)
        check_batch_size(batch_size)
        parts = []
        with torch_threads(self.num_threads), torch.inference_mode():
            for sl in batches(len(texts), batch_size, progress, "open_clip text"):
                tokens = self._oc.tokenizer(texts[sl]).to(self.device)  # [b, context_length]
                parts.append(self._finish(self._oc.model.encode_text(tokens)))
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


class OpenClipImageEncoder(_OpenClipBase):
    """CLIP image tower via open_clip, with open_clip's eval preprocessing; L2-normalised unless normalize=False."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", normalize: bool = True,
                 cache_dir: str | None = None, device: str = "cpu", seed: int = 0, num_threads: int | None = None):
        """Load the model (tag from the local cache, a checkpoint path, or None for a seeded random init)."""
        super().__init__("image", model, pretrained, normalize, cache_dir, device, seed, num_threads)

    def _probe_dim(self) -> int:
        from PIL import Image

        x = self._oc.preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            return int(self._oc.model.encode_image(x).shape[1])

    def encode(self, paths: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embed image files as float32 [n, dim]."""
        paths = check_paths(paths)
        check_batch_size(batch_size)
        parts = []
        with torch_threads(self.num_threads), torch.inference_mode():
            for sl in batches(len(paths), batch_size, progress, "open_clip image"):
                x = torch.stack([self._oc.preprocess(load_rgb(p)) for p in paths[sl]]).to(self.device)
                parts.append(self._finish(self._oc.model.encode_image(x)))
        return torch.cat(parts) if parts else torch.empty(0, self.dim)
