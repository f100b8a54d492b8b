"""The Python API: load a finished run and generate task networks from descriptions.

    from pipelines import load_run

    run = load_run("runs/default")
    net = run.generate("is the shape red?", answers=["yes", "no"], method="hnet_hyperldm", guidance=7.5, split="random", seed=0)
    net.predict(["a.png", "b.png"])  # -> ["yes", "no"]

Everything a generated network needs is read from the run: its text and image encoders (rebuilt from
`features/info.json` and checked against the ids recorded there), its image projection, the answer
prompts its tasks used, the sampling settings its evaluate stage used, and the trained models of the
chosen split and seed. Nothing here imports Ray or MLflow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.errors import UserError
from models.task_net import WeightLayout, functional_forward
from orchestrator.storage.rundir import RunDir
from pipelines.core.config import ConfigError


class RunMismatchError(UserError, ValueError):
    """An encoder, projection or weight layout does not match the run's; the message names both."""


@dataclass
class GeneratedNet:
    """One generated task network: flat weights `w`, its candidate answers and the run's encoders to call it."""

    description: str
    answers: list[str]
    answer_prompts: list[str]
    w: torch.Tensor = field(repr=False)  # [P] flat weights in the layout's order
    prompts: torch.Tensor = field(repr=False)  # [A, d_txt] answer-prompt embeddings
    layout: WeightLayout = field(repr=False)
    run: "Run" = field(repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named weights (fc1.weight, fc1.bias, fc2.weight, fc2.bias) that load into `models.task_net.TaskNetwork`."""
        return {k: v.clone() for k, v in self.layout.unflatten(self.w).items()}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Image features x [n, d_img] (already projected, see `Run.encode_images`) -> logits [n, A]."""
        with torch.no_grad():
            return functional_forward(self.layout, self.w, x, self.prompts)

    def predict(self, image_paths: list[str]) -> list[str]:
        """The answer the network gives for each image file."""
        return [self.answers[i] for i in self.logits(self.run.encode_images(image_paths)).argmax(1).tolist()]


class Run:
    """A finished run read back for generation: `load_run(path)` makes one."""

    def __init__(self, root: RunDir | Path | str, text_encoder=None, image_encoder=None):
        from pipelines.zeroshot.data import read_plan, store_spec

        self.dir = RunDir.of(root)
        self.splits, self.seeds = read_plan(self.dir)
        info_file = self.dir.features_info
        if not info_file.is_file():
            raise ConfigError(f"{self.dir.root} is not a finished run: {info_file} is missing")
        self.info = json.loads(info_file.read_text())
        if "config" not in self.info:
            raise ConfigError(f"{info_file} does not record its features config; rerun the features stage of that run")
        self.layout = WeightLayout(store_spec(self.dir))
        self._encoders = {"text": text_encoder, "image": image_encoder}
        for kind, enc in self._encoders.items():
            if enc is not None:
                self._check_encoder(kind, enc)
        self._data, self._models = {}, {}

    def __repr__(self) -> str:
        return f"Run({str(self.dir.root)!r}, splits={self.splits}, seeds={self.seeds})"

    # ---------------------------------------------------------------- what the run recorded
    def features_config(self):
        """The run's FeaturesConfig (encoder settings), as recorded in features/info.json."""
        from pipelines.core.config import build
        from pipelines.features import FeaturesConfig

        keep = {k: v for k, v in self.info["config"].items() if k not in ("tasks_file", "export_tasks", "cache_dir")}
        return build(FeaturesConfig, keep)

    def sampling(self):
        """The sampling settings the run's evaluate stage used (the defaults when it recorded none)."""
        import yaml

        from pipelines.core.config import build
        from pipelines.zeroshot.sampling import SamplingSettings

        cfg = yaml.safe_load(self.dir.config_file.read_text()) if self.dir.config_file.is_file() else None
        return build(SamplingSettings, ((cfg or {}).get("evaluate") or {}).get("sampling") or {})

    def answer_prompts(self, answers: list[str]) -> list[str]:
        """The prompt the run's tasks used for each answer; an answer the run never saw is its own prompt
        only where every task of the run used its answers as prompts."""
        import pandas as pd

        from orchestrator.storage.suite_features import TASKS_FILE

        tasks = pd.read_parquet(self.dir.features / TASKS_FILE, columns=["answers", "answer_prompts"])
        seen: dict[str, set[str]] = {}
        for ans, prm in zip(tasks["answers"], tasks["answer_prompts"]):
            for a, p in zip(ans, prm):
                seen.setdefault(a, set()).add(p)
        verbatim = all(ps == {a} for a, ps in seen.items())
        out = []
        for a in answers:
            ps = seen.get(a, {a} if verbatim else set())
            if len(ps) != 1:
                why = "several prompts" if ps else "no prompt"
                raise ConfigError(f"answer {a!r} has {why} in the run's tasks; pass answer_prompts=[...] explicitly")
            out.append(next(iter(ps)))
        return out

    # ---------------------------------------------------------------- encoders
    def _check_encoder(self, kind: str, enc) -> None:
        want = self.info[f"{kind}_encoder"]
        if enc.id != want:
            raise RunMismatchError(f"{kind} encoder {enc.id!r} does not match the run's {want!r} "
                                   f"(recorded in {self.dir.features_info}); use the run's encoder settings")

    def _encoder(self, kind: str):
        """The run's `kind` encoder: built from its recorded settings on first use, checked against its id."""
        if self._encoders.get(kind) is None:
            from pipelines import features

            self._encoders[kind] = getattr(features, f"make_{kind}_encoder")(self.features_config())
            self._check_encoder(kind, self._encoders[kind])
        return self._encoders[kind]

    @property
    def text_encoder(self):
        """The run's text encoder (built on first use, checked against the run's id)."""
        return self._encoder("text")

    @property
    def image_encoder(self):
        """The run's image encoder (built on first use, checked against the run's id)."""
        return self._encoder("image")

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings [n, d_txt] from the run's text encoder, in one batch."""
        t = self.text_encoder.encode(list(texts))
        if t.shape[1] != self.layout.spec.d_txt:
            raise RunMismatchError(f"text embeddings are {t.shape[1]}-d; the run's task network takes {self.layout.spec.d_txt}")
        return t

    def encode_images(self, paths: list[str], progress: bool = False) -> torch.Tensor:
        """Image features [n, d_img] as the run's task networks take them: encoded, then the run's projection."""
        from pipelines.features import PROJECTION_FILE, apply_projection

        x = self.image_encoder.encode([str(p) for p in paths], progress=progress).numpy()
        projection = self.dir.features / PROJECTION_FILE
        if projection.exists():
            from safetensors.numpy import load_file

            d_in = load_file(str(projection))["components"].shape[1]
            if x.shape[1] != d_in:
                raise RunMismatchError(f"image features are {x.shape[1]}-d; the run's projection {projection} takes {d_in}")
            x = apply_projection(x, projection)
        if x.shape[1] != self.layout.spec.d_img:
            raise RunMismatchError(f"image features are {x.shape[1]}-d; the run's task network takes {self.layout.spec.d_img}")
        return torch.from_numpy(x)

    # ---------------------------------------------------------------- generation
    def models(self, split: str | None = None, seed: int | None = None):
        """The trained zero-shot models of (split, seed); the run's first split and seed by default."""
        from pipelines.zeroshot.data import load_split
        from pipelines.zeroshot.trained import TrainedModels

        split = self.splits[0] if split is None else split
        seed = self.seeds[0] if seed is None else seed
        if split not in self.splits or seed not in self.seeds:
            raise ConfigError(f"split {split!r} seed {seed}: the run trained splits {self.splits} and seeds {self.seeds}")
        if split not in self._data:
            self._data[split] = load_split(self.dir, split)
        if (split, seed) not in self._models:
            self._models[split, seed] = TrainedModels(self.dir, self._data[split], seed)
        return self._models[split, seed]

    def generate(self, description: str | list[str], answers: list[str] | list[list[str]], method: str = "hnet_hyperldm",
                 guidance: float | None = None, split: str | None = None, seed: int | None = None,
                 answer_prompts: list[str] | list[list[str]] | None = None, sampling=None):
        """A GeneratedNet for a description, or a list of them for a list of descriptions (one batch).

        `answers` is one list shared by every description or one list per description; `guidance` is
        HyperLDM's γ; `sampling` (SamplingSettings) replaces the run's other sampling settings.
        """
        from pipelines.zeroshot.methods import generate

        one = isinstance(description, str)
        descs = [description] if one else list(description)
        per_task = lambda v: [list(v)] * len(descs) if v and isinstance(v[0], str) else [list(x) for x in v]  # noqa: E731
        answers = per_task(answers)
        prompts = per_task(answer_prompts) if answer_prompts is not None else [self.answer_prompts(a) for a in answers]
        if not descs or len(answers) != len(descs) or len(prompts) != len(descs):
            raise ConfigError(f"{len(descs)} descriptions, {len(answers)} answer lists, {len(prompts)} prompt lists: give one each")
        for a, p in zip(answers, prompts):
            if len(a) < 2 or len(a) != len(p):
                raise ConfigError(f"answers {a} with prompts {p}: a task needs at least two answers, one prompt each")
        s = sampling if sampling is not None else self.sampling()
        if guidance is not None:
            s = replace(s, guidance_scale=float(guidance))
        texts = sorted({*descs, *(q for p in prompts for q in p)})
        emb = self.encode_texts(texts)  # every description and prompt in one batch
        at = {t: i for i, t in enumerate(texts)}
        c = emb[[at[d] for d in descs]]  # [B, d_txt]
        w = generate(method, self.models(split, seed), c, s)  # [B, P]
        if w.shape[1] != self.layout.size:
            raise RunMismatchError(f"{method} made {w.shape[1]} weights; the run's task network has {self.layout.size}")
        nets = [GeneratedNet(d, a, p, w[i], emb[[at[q] for q in p]], self.layout, self)
                for i, (d, a, p) in enumerate(zip(descs, answers, prompts))]
        return nets[0] if one else nets


def load_run(path: RunDir | Path | str, text_encoder=None, image_encoder=None) -> Run:
    """A finished run, ready to generate; pass encoders only to reuse ones already loaded (their ids must match the run's)."""
    return Run(path, text_encoder, image_encoder)
