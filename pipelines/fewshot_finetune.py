"""Few-shot rows for the run's zero-shot models given the same support sets (issue 5, item 3).

For every (split, training seed) whose zero-shot baselines exist in `<run_dir>/models/baselines/`,
each meta-test task gets the weights a zero-shot model makes for it (its description for the
text-conditioned hypernetwork; the one shared network for multitask), and those are fine-tuned on
each episode's support set (models.fewshot.finetune) and scored on its queries: the same seeded
episodes as the few-shot methods. HyperLDM with few-shot gradient guidance is not built (README).
Runs in the driver: no training, a few vmapped gradient steps per episode.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

FINETUNED = {"finetune_multitask": "multitask", "finetune_text_hnet": "text_hnet"}  # row name -> zero-shot method


def finetune_rows(
    run_dir, split: str, label: str, feats, test_ids: list[str], pool, episodes: dict, cfg, log: Callable[[str], None],
) -> list[dict]:
    """Result rows (split=label) of every fine-tuned zero-shot model of `split`; [] with a log line when the run has none."""
    from models.fewshot import training as T
    from models.fewshot.episodes import collate
    from models.fewshot.finetune import finetuned_accuracy
    from pipelines.zs_data import ZeroShotError, load_split, model_path
    from pipelines.zs_models import Sampling, generate

    seeds = [s for s in cfg.seeds if model_path(run_dir, "baselines", split, s).exists()]
    if not seeds:
        log(f"fewshot: no zero-shot baselines for split {split!r} in {run_dir}/models/baselines "
            f"(run pipelines.generators and pipelines.baselines first): fine-tuning rows skipped")
        return []
    try:
        data = load_split(run_dir, split, feats)
    except ZeroShotError as e:
        log(f"fewshot: fine-tuning rows of split {split!r} skipped: {e}")
        return []
    where = {t: i for i, t in enumerate(data.test_ids)}
    if set(where) != set(test_ids):
        raise RuntimeError(f"split {split!r}: the zero-shot models' meta-test tasks differ from the few-shot stage's")
    to_data = torch.tensor([where[t] for t in test_ids])  # pool row -> the split's meta-test row
    img = torch.as_tensor(feats.image_feats)
    rows = []
    for seed in seeds:
        for name, zs in FINETUNED.items():
            w_task = generate(zs, data, seed, data.test.c, Sampling())[to_data]  # [N_test, P] in pool order
            for k, eps in episodes.items():
                acc = []
                for i in range(0, len(eps), cfg.eval_batch):
                    b = collate(eps[i: i + cfg.eval_batch], img, pool.prompts)
                    acc.append(finetuned_accuracy(data.layout, w_task[b.task], b, cfg.finetune_steps, cfg.finetune_lr).numpy())
                acc = np.concatenate(acc)
                mean, ci = T.mean_ci95(acc)
                rows.append(dict(split=label, method=name, shots=k, seed=seed, accuracy=mean, ci95=ci, episodes=len(acc)))
                log(f"  {label} {name} K={k} seed {seed}: {mean:.3f} ± {ci:.3f}")
    return rows
