"""Stage `features`: build a task suite and embed its images and texts with frozen encoders.

    python -m pipelines.features --preset default --set suite=procedural --set n_tasks=3000

Writes `<run_dir>/features/` (see orchestrator.storage.suite_features). Encoder outputs are cached in Parquet
keyed by encoder id and content hash, so a second run (or another run sharing `cache_dir`) encodes
nothing it has seen.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from pipelines.core.cli import RunContext
from pipelines.core.config import ConfigError, Runtime, Seed, config_values, result_values, stage_config
from pipelines.suites import SUITES

SPLIT_MODES = ("random", "compositional")


@stage_config("features")
class FeaturesConfig:
    """Which tasks to build and which frozen encoders embed them."""

    suite: Literal[SUITES] = "easyvqa"
    """task suite: easyvqa (107 question tasks) or procedural (generated predicates, 100 to 27,569 tasks); ignored when tasks_file is set"""
    tasks_file: str | None = None
    """a JSONL task file (docs/task_file.md) used instead of a suite (the same as --tasks)"""
    split_mode: Literal[SPLIT_MODES] = "random"
    """meta-train/meta-test split: random, or compositional (tasks mentioning a holdout concept go to meta-test)"""
    holdout: tuple[str, ...] = ("gray", "teal", "triangle")
    """concepts held out by the compositional split"""
    meta_test_fraction: Annotated[float, Field(ge=0.01, le=0.99)] = 0.3
    """share of tasks in meta-test (random split)"""
    support_fraction: Annotated[float, Field(ge=0.05, le=0.95)] = 0.7
    """share of each task's samples in its support set (stratified by answer)"""
    n_tasks: Annotated[int, Field(ge=1)] = 1000
    """procedural: number of tasks to generate"""
    samples_per_task: Annotated[int, Field(ge=4)] = 200
    """procedural: images per task"""
    max_samples_per_task: Annotated[int, Field(ge=4)] | None = None
    """easyvqa: cap samples per task (none keeps all)"""
    text_encoder: Literal[TEXT_ENCODERS] = "minilm"
    """minilm (offline default) or open_clip (optional extra)"""
    image_encoder: Literal[IMAGE_ENCODERS] = "efficientnet_lite0"
    """efficientnet_lite0 (offline default) or open_clip (optional extra)"""
    image_size: Annotated[int, Field(ge=32, le=1024)] = 96
    """efficientnet input size in pixels"""
    image_dims: Annotated[int, Field(ge=0)] = 128
    """keep the top principal components of the image features (0: the encoder's full width); saved as features/image_projection.safetensors"""
    clip_model: str = "ViT-L-14-336"
    """open_clip model (the paper's; ViT-B-32 for quick runs); open_clip encoders only"""
    clip_pretrained: str | None = "openai"
    """open_clip pretrained tag or local checkpoint path (none: random init, tests only)"""
    device: Annotated[str, Runtime, Field(pattern=r"^(cpu|cuda(:[0-9]+)?|mps)$")] = "cpu"
    """where the encoders run: cpu, cuda, cuda:1 (features are cached, so encoding runs once)"""
    export_tasks: Annotated[str | None, Runtime] = None
    """also write the suite as a JSONL task file here (docs/task_file.md)"""
    cache_dir: Annotated[str | None, Runtime] = None
    """feature cache folder (default <run_dir>/cache/features); point several runs at one folder to share it"""
    seed: Seed = 0
    """seeds the support/query and task splits and procedural generation"""

    @field_validator("tasks_file")
    @classmethod
    def _tasks_file_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError("no such file; pass the path of a JSONL task file (docs/task_file.md)")
        return path


CONFIG = FeaturesConfig
NEEDS_RAY = False
PRESETS = {
    "smoke": dict(suite="procedural", n_tasks=24, samples_per_task=40, image_size=64),
    "default": dict(),
}


def load_tasks(cfg: FeaturesConfig):
    """The configured suite (or task file) as a TaskSuite."""
    from pipelines.suites import load_suite

    common = dict(split_mode=cfg.split_mode, meta_test_fraction=cfg.meta_test_fraction,
                  support_fraction=cfg.support_fraction, seed=cfg.seed)
    if cfg.tasks_file:
        return load_suite(cfg.suite, tasks_file=cfg.tasks_file, support_fraction=cfg.support_fraction,
                          meta_test_fraction=cfg.meta_test_fraction, seed=cfg.seed)
    if cfg.suite == "procedural":
        return load_suite("procedural", n_tasks=cfg.n_tasks, samples_per_task=cfg.samples_per_task,
                          holdout=cfg.holdout, **common)
    return load_suite("easyvqa", holdout=cfg.holdout, max_samples_per_task=cfg.max_samples_per_task, **common)


def make_encoders(cfg: FeaturesConfig):
    """The configured (text, image) encoders."""
    return make_text_encoder(cfg), make_image_encoder(cfg)


def make_text_encoder(cfg: FeaturesConfig):
    """The configured text encoder (the Python API loads it alone: generating needs no images)."""
    from models.encoders import make_text_encoder as make

    clip = dict(model=cfg.clip_model, pretrained=cfg.clip_pretrained)
    return make(cfg.text_encoder, device=cfg.device, **(clip if cfg.text_encoder == "open_clip" else {}))


def make_image_encoder(cfg: FeaturesConfig):
    """The configured image encoder."""
    from models.encoders import make_image_encoder as make

    opts = dict(model=cfg.clip_model, pretrained=cfg.clip_pretrained) if cfg.image_encoder == "open_clip" else {"image_size": cfg.image_size}
    return make(cfg.image_encoder, device=cfg.device, **opts)


def features_hash(cfg: FeaturesConfig) -> str:
    """Identifies the features a config produces (the task file's bytes included; runtime fields left out)."""
    d = result_values(cfg)
    if cfg.tasks_file:
        d["tasks_file_sha256"] = hashlib.sha256(Path(cfg.tasks_file).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


PROJECTION_FILE = "image_projection.safetensors"


def fit_projection(img: np.ndarray, dims: int, path: Path) -> np.ndarray:
    """Project image features [n, d] onto their top `dims` principal components; save (mean, components) to `path`.

    The task network's first layer is most of its weights (d_img x hidden); a frozen linear projection
    of the frozen encoder's features shrinks every weight vector the generative models must produce
    (54k -> 17k weights at 1280 -> 128 dims) and keeps nearly all the features' variance. Unsupervised:
    fit on the suite's images, no labels.
    """
    from safetensors.numpy import save_file

    from orchestrator.storage.atomic import atomic_path

    x = img.astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dims]  # [dims, d]
    with atomic_path(path) as tmp:
        save_file({"mean": mean.astype(np.float32), "components": comps.astype(np.float32)}, str(tmp))
    return apply_projection(img, path)


def apply_projection(img: np.ndarray, path: Path) -> np.ndarray:
    """Image features [n, d] -> [n, dims] with a projection saved by `fit_projection`."""
    from safetensors.numpy import load_file

    p = load_file(str(path))
    return ((img - p["mean"]) @ p["components"].T).astype(np.float32)


def check_writable(folder: Path, name: str) -> None:
    """A ConfigError naming the field unless `folder` exists (or can be made) and takes files; checked before any work."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{name}: cannot write to {folder} ({e.strerror}); choose a writable folder") from None


def saved_config_hash(folder: Path) -> str | None:
    """The config hash recorded in a features folder's info.json; None when missing or unreadable (then rebuilt)."""
    from orchestrator.storage.suite_features import info_path

    try:
        return json.loads(info_path(folder).read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def run(cfg: FeaturesConfig, ctx: RunContext):
    """Build (or reuse) `<run_dir>/features` for this config; returns the SuiteFeatures."""
    from orchestrator.storage.atomic import atomic_dir
    from orchestrator.storage.feature_cache import FeatureCache, encode_images_cached, encode_texts_cached
    from orchestrator.storage.suite_features import FeaturesError, SuiteFeatures

    out = ctx.run.features
    for name, folder in (("export_tasks", cfg.export_tasks and Path(cfg.export_tasks).parent), ("cache_dir", cfg.cache_dir)):
        if folder:
            check_writable(Path(folder), name)
    chash = features_hash(cfg)
    reuse = saved_config_hash(out) == chash
    if reuse and not cfg.export_tasks:
        try:
            feats = SuiteFeatures.load(out)
            ctx.log(f"features: reusing {out} (same config)")
            return feats
        except FeaturesError as e:  # e.g. a truncated Parquet file: derived data, so rebuild (the encoder cache makes it cheap)
            ctx.log(f"features: {out} is unreadable ({e.__cause__}); rebuilding it")
            reuse = False
    t0 = time.perf_counter()
    suite = load_tasks(cfg)
    if cfg.export_tasks:
        from pipelines.suites import write_task_file

        write_task_file(suite, Path(cfg.export_tasks))
        ctx.log(f"features: exported {len(suite.tasks)} tasks to {cfg.export_tasks}")
        if reuse:
            return SuiteFeatures.load(out)
    if not suite.tasks:
        from pipelines.suites import SuiteError

        raise SuiteError("the suite has no tasks: check the task file or the suite settings")
    text_enc, image_enc = make_encoders(cfg)
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else ctx.run.feature_cache)
    used = sorted({int(i) for t in suite.tasks for i in np.concatenate([t.support_images, t.query_images])})
    remap = np.full(len(suite.images), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    paths = [suite.images[i] for i in used]
    ctx.log(f"features: {len(suite.tasks)} tasks, {len(paths)} images, encoders {text_enc.id} / {image_enc.id}")
    t_img = time.perf_counter()
    img = encode_images_cached(image_enc, paths, cache, progress=ctx.progress)
    t_img = time.perf_counter() - t_img
    # Everything goes to a temporary sibling folder that replaces `out` whole once complete: a failure
    # leaves the previous features (and their image projection) as they were.
    with atomic_dir(out) as staged:
        if 0 < cfg.image_dims < min(img.shape):
            img = fit_projection(img, cfg.image_dims, staged / PROJECTION_FILE)
        elif 0 < cfg.image_dims < img.shape[1]:  # too few images to estimate that many components
            ctx.log(f"features: {len(img)} images are fewer than image_dims={cfg.image_dims}; keeping all {img.shape[1]} dims")
        texts = sorted({s for t in suite.tasks for s in [t.description, *t.answer_prompts]})
        text_id = {s: i for i, s in enumerate(texts)}
        t_txt = time.perf_counter()
        txt = encode_texts_cached(text_enc, texts, cache, progress=ctx.progress)
        t_txt = time.perf_counter() - t_txt
        tasks = pd.DataFrame([
            dict(
                id=t.id, description=t.description, split=t.split, answers=list(t.answers),
                answer_prompts=list(t.answer_prompts), concepts=list(t.concepts),
                desc_text=text_id[t.description], prompt_texts=np.array([text_id[p] for p in t.answer_prompts]),
                support_images=remap[t.support_images], support_labels=np.asarray(t.support_labels, dtype=np.int64),
                query_images=remap[t.query_images], query_labels=np.asarray(t.query_labels, dtype=np.int64),
            )
            for t in suite.tasks
        ])
        info = dict(
            config_hash=chash, suite=suite.name, suite_info=suite.info, text_encoder=text_enc.id,
            image_encoder=image_enc.id, d_img=int(img.shape[1]), d_txt=int(txt.shape[1]),
            n_tasks=len(tasks), n_images=len(paths), splits=tasks["split"].value_counts().to_dict(),
            config=config_values(cfg),  # lets pipelines.zero_shot encode new tasks alike
        )
        feats = SuiteFeatures(paths, img, texts, txt, tasks, info)
        feats.save(staged)
    ctx.timings["features_image_encode_s"] = t_img
    ctx.timings["features_loop_s"] = t_img + t_txt  # the encoding loops; loading the encoders is overhead
    ctx.log(f"features: wrote {out} in {time.perf_counter() - t0:.1f}s (images {t_img:.1f}s)")
    return feats


def track(feats, ctx: RunContext) -> tuple[dict[str, float], list[Path]]:
    """Counts worth logging for a features run, and its info file."""
    t = feats.tasks
    m = {"tasks": len(t), "images": len(feats.image_paths), "texts": len(feats.texts)}
    for split, n in t["split"].value_counts().items():
        m[f"tasks_{split}"] = int(n)
    m["answers_per_task_mean"] = float(t["answers"].map(len).mean())
    m["support_per_task_mean"] = float(t["support_images"].map(len).mean())
    return m, [ctx.run.features_info]


def main() -> int:
    from pipelines.core.runner import run_stages

    return run_stages("features", __doc__)


if __name__ == "__main__":
    from pipelines.core.cli import guarded

    guarded(main)()
