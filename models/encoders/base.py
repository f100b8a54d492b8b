"""What every frozen encoder shares: the two protocols, the error type, image loading and batching."""
from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from models.errors import UserError

# The offline default: Hugging Face libraries read these once, at import, so set them before any of
# them is imported. setdefault keeps an explicit HF_HUB_OFFLINE=0 on a machine that may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class EncoderError(UserError, ValueError):
    """Bad encoder name, option, weights or input; the message says what was wrong and how to fix it."""


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen text encoder: `id` names everything that changes its outputs (it keys the feature cache)."""

    id: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed `texts` as float32 [len(texts), dim] on the CPU."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    """A frozen image encoder: `id` names everything that changes its outputs (it keys the feature cache)."""

    id: str
    dim: int

    def encode(self, paths: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embed the image files at `paths` as float32 [len(paths), dim] on the CPU."""
        ...


def check_options(kind: str, name: str, factory: Callable, opts: dict) -> None:
    """Raise EncoderError when `opts` holds a keyword that `factory` does not take."""
    valid = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise EncoderError(
            f"unknown option(s) {unknown} for {kind} encoder {name!r}; valid options are {valid}"
        )


def check_batch_size(batch_size: int) -> None:
    """Raise EncoderError unless batch_size is a positive int."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EncoderError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_texts(texts: list[str]) -> list[str]:
    """Return texts as a list, raising EncoderError if any item is not a str."""
    if isinstance(texts, str):
        raise EncoderError("encode() takes a list of strings, got one string; wrap it: encode([text])")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EncoderError(f"texts[{i}] is {type(t).__name__}, not str; pass a list of strings")
    return texts


def not_a_file(path: str) -> str | None:
    """Why `path` is not a readable image file ("not found", "a directory"), or None when it is a file."""
    if os.path.isfile(path):
        return None
    return "a directory, not a file" if os.path.isdir(path) else "not found"


def check_image_files(paths: list[str]) -> None:
    """Raise EncoderError naming the paths that are not existing files, and why (checked before any encoding)."""
    bad = [(p, why) for p in paths if (why := not_a_file(p))]
    if bad:
        shown = ", ".join(f"{p!r} ({why})" for p, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise EncoderError(f"{len(bad)} image path(s) are not image files: {shown}{more}; "
                           "check the paths (absolute, or relative to the working directory)")


def check_paths(paths: list[str]) -> list[str]:
    """Return paths as a list of str, raising EncoderError naming any that is not an existing file."""
    if isinstance(paths, (str, os.PathLike)):
        raise EncoderError("encode() takes a list of image paths, got one path; wrap it: encode([path])")
    paths = [os.fspath(p) for p in paths]
    # Checked up front: failing after minutes of encoding because image 4,000 is missing is worse.
    check_image_files(paths)
    return paths


def load_rgb(path: str):
    """Open an image file as an RGB PIL image, or raise EncoderError naming the path."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't decode, a huge image
            with Image.open(path) as img:
                return img.convert("RGB")  # convert() forces the lazy decode inside the try
    except FileNotFoundError as e:
        raise EncoderError(f"image file not found: {path!r}; check the path exists") from e
    except IsADirectoryError as e:
        raise EncoderError(f"image path {path!r} is a directory, not an image file; point it at the image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EncoderError(
            f"image {path!r} claims {e}; refusing to decode it (a decompression bomb, or a far larger image "
            "than the encoders need): resize it or remove it"
        ) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EncoderError(
            f"cannot read image {path!r} ({type(e).__name__}: {e}); "
            "replace or remove it: it must be an image file PIL can open (PNG, JPEG, ...)"
        ) from e


def load_resized(path: str, size: int) -> np.ndarray:
    """Load an image as uint8 [size, size, 3], squashed to a square with bicubic resampling."""
    from PIL import Image

    img = load_rgb(path)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[slice]:
    """Yield consecutive slices of range(n), with a tqdm bar counting items when progress is set."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="item")
    try:
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            yield sl
            if bar is not None:
                bar.update(sl.stop - sl.start)
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch intra-op threads set to n (None: torch's default, capped at usable CPUs)."""
    if n is None:
        # torch counts the host's cores; a container or CPU affinity mask may allow fewer, and
        # oversubscribed threads slow convolutions down several-fold.
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if torch.get_num_threads() <= usable:
            yield
            return
        n = usable
    if not isinstance(n, int) or n < 1:
        raise EncoderError(f"num_threads must be a positive integer or None, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def package_version(dist: str) -> str:
    """Installed version of distribution `dist`, or 'unknown' (it goes into encoder ids)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
