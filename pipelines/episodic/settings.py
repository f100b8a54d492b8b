"""Each few-shot method's own settings, nested in the stage's config (`--set fewshot.hypermaml.lr=3e-4`).

Every method has its meta-training schedule (train_steps x tasks_per_batch episodes, Adam lr) and the
knobs of its own model; `models.fewshot.training` reads them by name. FOMAML shares MAML's.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipelines.core.config import stage_config

Steps = Annotated[int, Field(ge=1)]
Lr = Annotated[float, Field(ge=1e-7, le=1.0)]


@stage_config("maml", seed_field=None)
class MamlSettings:
    """MAML and FOMAML: a meta-learned init of the whole task network, adapted by SGD on the support set."""

    train_steps: Steps = 150
    """meta-training steps"""
    tasks_per_batch: Steps = 16
    """episodes per meta-training step"""
    lr: Lr = 1e-3
    """Adam learning rate of the meta-parameters"""
    inner_steps: Annotated[int, Field(ge=1, le=1000)] = 5
    """inner SGD steps on the support set"""
    inner_lr: Annotated[float, Field(ge=1e-6, le=100.0)] = 0.5
    """inner learning rate"""


@stage_config("hypermaml", seed_field=None)
class HyperMamlSettings:
    """HyperMAML: a hypernetwork's update of the head (fc2) on the frozen multitask extractor, after a MAML warm-up."""

    train_steps: Steps = 300
    """meta-training steps (600 measured no better)"""
    tasks_per_batch: Steps = 8
    """episodes per meta-training step"""
    lr: Lr = 1e-3
    """Adam learning rate"""
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    """MAML warm-up steps (paper: 5)"""
    warmup_lr: Annotated[float, Field(ge=0.0)] = 0.01
    """MAML warm-up learning rate (paper: 0.01)"""
    warmup_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    """share of training over which the warm-up blends into the hypernetwork"""
    rotate_views: bool = True
    """the hypernetwork sees h in a random basis per training episode (false: it overfits the meta-train concepts)"""


@stage_config("hypertransformer", seed_field=None)
class HyperTransformerSettings:
    """HyperTransformer: a transformer over support tokens writes the head's class rows on the frozen extractor."""

    train_steps: Steps = 300
    """meta-training steps (600 measured no better)"""
    tasks_per_batch: Steps = 8
    """episodes per meta-training step"""
    lr: Lr = 1e-3
    """Adam learning rate"""
    layers: Literal["last", "all"] = "last"
    """generate the last layer (fc2) or all layers"""
    init_gain: Annotated[float, Field(ge=0.0, le=100.0)] = 0.3
    """initial gain of its transformer-made class rows"""
    rotate_views: bool = True
    """the transformer sees h in a random basis per training episode (false: it overfits the meta-train concepts)"""


@stage_config("metadiff", seed_field=None)
class MetaDiffSettings:
    """MetaDiff: the head denoised from noise, conditioned on the support-loss gradient, on the frozen extractor."""

    train_steps: Steps = 400
    """meta-training steps (at 150 its accuracy swung 0.65-0.84 between seeds)"""
    tasks_per_batch: Steps = 16
    """episodes per meta-training step"""
    lr: Lr = 1e-3
    """Adam learning rate"""
    denoise_steps: Annotated[int, Field(ge=1, le=1000)] = 5
    """DDIM denoising steps (the inner-loop length, as MAML's inner_steps)"""
    width: Annotated[int, Field(ge=8)] = 128
    """denoiser width"""
    target_steps: Annotated[int, Field(ge=1)] = 100
    """fine-tuning steps of each meta-train task's target fc2"""


@stage_config("finetune", seed_field=None)
class FinetuneSettings:
    """The rows scored from the run's zero-shot models (where it has them), on the same episodes."""

    steps: Annotated[int, Field(ge=0)] = 10
    """fine-tuning baselines: gradient steps on the support set"""
    lr: Annotated[float, Field(ge=1e-6, le=100.0)] = 0.1
    """fine-tuning baselines: their learning rate"""
    ldm_steps: Annotated[int, Field(ge=1, le=1000)] = 20
    """HyperLDM rows: DDIM steps"""
    ldm_support_scale: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    """HyperLDM rows: support-loss guidance scale, in units of the noise (untuned)"""
