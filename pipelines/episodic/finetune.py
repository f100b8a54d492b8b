"""Few-shot rows for the run's zero-shot models given the same support sets.

For every (split, training seed) whose zero-shot baselines the run trained,
each meta-test task gets the weights a zero-shot model makes for it (its description for the
text-conditioned hypernetwork; the one shared network for multitask), and those are fine-tuned on
each episode's support set (models.fewshot.finetune) and scored on its queries: the same seeded
episodes as the few-shot methods. Where the run also has HyperLDM (HNet route), it samples weights
from the task's description (classifier-free guidance γ = 1, DDIM) plain (`hnet_hyperldm`) and with
classifier guidance by each episode's support loss (`hnet_hyperldm_support_guided`).
Runs in the driver: no training, a few vmapped gradient steps or sampler steps per episode.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from orchestrator.storage.rundir import RunDir

FINETUNED = {"finetune_multitask": "multitask", "finetune_text_hnet": "text_hnet"}  # row name -> zero-shot method


def finetune_rows(
    run, split: str, label: str, feats, test_ids: list[str], pool, episodes: dict, cfg, log: Callable[[str], None],
) -> list[dict]:
    """Result rows (split=label) of every fine-tuned zero-shot model of `split`; [] with a log line when the run has none."""
    from models.fewshot import training as T
    from models.fewshot.episodes import collate
    from models.fewshot.finetune import finetuned_accuracy
    from pipelines.zeroshot.data import ZeroShotError, load_split
    from pipelines.zeroshot.methods import generate
    from pipelines.zeroshot.sampling import SamplingSettings
    from pipelines.zeroshot.trained import TrainedModels

    run = RunDir.of(run)
    seeds = [s for s in cfg.seeds if run.model("baselines", split, s).exists()]
    if not seeds:
        log(f"fewshot: no zero-shot baselines for split {split!r} in {run.model_dir('baselines')} "
            f"(run pipelines.generators and pipelines.baselines first): fine-tuning rows skipped")
        return []
    try:
        data = load_split(run, split, feats)
    except ZeroShotError as e:
        log(f"fewshot: fine-tuning rows of split {split!r} skipped: {e}")
        return []
    where = {t: i for i, t in enumerate(data.test_ids)}
    if set(where) != set(test_ids):
        raise RuntimeError(f"split {split!r}: the zero-shot models' meta-test tasks differ from the few-shot stage's")
    to_data = torch.tensor([where[t] for t in test_ids])  # pool row -> the split's meta-test row
    img = torch.as_tensor(feats.image_feats)
    rows = []

    def score(name: str, seed: int, k: int, accuracy_of: Callable) -> None:
        eps = episodes[k]
        acc = np.concatenate([accuracy_of(collate(eps[i: i + cfg.eval_batch], img, pool.prompts)).numpy()
                              for i in range(0, len(eps), cfg.eval_batch)])
        mean, ci = T.mean_ci95(acc)
        rows.append(dict(split=label, method=name, shots=k, seed=seed, accuracy=mean, ci95=ci, episodes=len(acc)))
        log(f"  {label} {name} K={k} seed {seed}: {100 * mean:.1f} % ± {100 * ci:.1f} (95 % CI half-width)")

    for seed in seeds:
        models = TrainedModels(run, data, seed)
        for name, zs in FINETUNED.items():
            w_task = generate(zs, models, data.test.c, SamplingSettings())[to_data]  # [N_test, P] in pool order
            for k in episodes:
                score(name, seed, k, lambda b: finetuned_accuracy(data.layout, w_task[b.task], b, cfg.finetune.steps, cfg.finetune.lr))
        if not all(run.model(kind, split, seed).exists() for kind in ("generators", "hyperldm")):
            log(f"fewshot: no HyperLDM for split {split!r} seed {seed}: its rows skipped")
            continue
        route, ldm = models.routes["hnet"], models.hyperldms["hnet"]
        c_task = data.test.c[to_data]  # [N_test, d_txt] descriptions in pool order
        for name, scale in (("hnet_hyperldm", 0.0), ("hnet_hyperldm_support_guided", cfg.finetune.ldm_support_scale)):
            for k in episodes:
                score(name, seed, k, lambda b: guided_accuracy(data.layout, route, ldm, c_task[b.task], b, scale, cfg.finetune.ldm_steps, seed))
    return rows


@torch.no_grad()
def guided_accuracy(layout, route, ldm, c: torch.Tensor, batch, scale: float, steps: int, seed: int) -> torch.Tensor:
    """Query accuracy [B] of HyperLDM samples for descriptions c [B, d_c], guided by each episode's support loss."""
    from models.fewshot.episodes import batch_accuracy, batch_loss
    from models.fewshot.finetune import support_guided_latents

    z_T = torch.randn(len(c), route.z_train.shape[1], generator=torch.Generator().manual_seed(seed))
    to_weights = lambda z: route.decode(ldm.standardizer.decode(z))  # noqa: E731  standardised latents -> raw w
    z = support_guided_latents(ldm.diffusion, ldm.denoiser, c, 1.0, z_T, steps, scale,
                               lambda z: batch_loss(layout, to_weights(z), *batch.support()))
    return batch_accuracy(layout, to_weights(z), *batch.query())
