"""Trained zero-shot models read back from a run: routes, HyperCLIPs, HyperLDMs and baselines.

A *route* is a latent space with a decoder to weights: `hnet` (HNet latents, adapted per task from the
meta latent) or `hvae` (HVAE posterior means of the experts). HyperCLIP and HyperLDM are trained per
route. `TrainedModels` loads each kind once per (split, seed), on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from models.weight_norm import WeightNormalizer
from models.zeroshot.hnet import invert
from models.zeroshot.hvae import HVAE
from models.zeroshot.hyperclip import HyperCLIP
from models.zeroshot.task_models import LatentHNet, SharedWeights, TextHNet
from orchestrator.storage.rundir import RunDir
from pipelines.zeroshot.data import SplitData, load_model

ROUTES = ("hnet", "hvae")


@dataclass
class Route:
    """A latent space of task networks: training latents, a decoder to normalised weights, a start point."""

    name: str
    z_train: torch.Tensor  # [N, d] latents of the meta-train tasks
    decode_n: Callable[[torch.Tensor], torch.Tensor]  # z [B, d] -> normalised weights [B, P]
    z_start: torch.Tensor  # [d] where HyperCLIP guidance starts (the meta latent / the experts' mean latent)
    norm: WeightNormalizer
    encode_n: Callable[[torch.Tensor], torch.Tensor]  # normalised weights [B, P] -> latents [B, d]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, d] -> raw task-network weights [B, P]."""
        return self.norm.decode(self.decode_n(z))

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Raw task-network weights [B, P] -> latents [B, d] (the HVAE's posterior mean; the HNet's projection)."""
        with torch.no_grad():
            wn = self.norm.encode(w)
        return self.encode_n(wn).detach()


def sub_state(state: dict, prefix: str) -> dict:
    """Entries of `state` under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class TrainedModels:
    """The zero-shot models a run trained for one split and seed, each kind loaded once when first used."""

    def __init__(self, run: RunDir | str, data: SplitData, seed: int):
        self.run, self.data, self.seed = RunDir.of(run), data, seed
        self.tuned: dict[str, float] = {}  # settings a baseline chose on the validation tasks, once per (split, seed)
        self.hybrid_starts: dict[tuple, tuple] = {}  # the hybrids' start latents (pipelines.zeroshot.methods.hybrid)

    def _load(self, kind: str) -> tuple[dict, dict]:
        """(state, stage config) of this split and seed's model of `kind`."""
        state, side = load_model(self.run.model(kind, self.data.name, self.seed))
        return state, side["stage_config"]

    @cached_property
    def routes(self) -> dict[str, Route]:
        """The HNet and HVAE routes trained by the generators stage."""
        data = self.data
        state, cfg = self._load("generators")
        hidden = tuple(cfg["hidden"])
        hnet = LatentHNet(data.norm, data.train.batch.n, cfg["d_latent"], hidden, torch.Generator())
        hnet.load_state_dict(sub_state(state, "hnet"))
        vae = HVAE(data.layout.size, cfg["d_latent"], hidden)
        vae.load_state_dict(sub_state(state, "hvae"))
        for m in (hnet, vae):
            m.eval().requires_grad_(False)
        mu = state["hvae_latents"]
        meta = hnet.latents.meta.detach()
        return {
            "hnet": Route("hnet", hnet.latents.z.detach(), hnet.hnet, meta, hnet.norm,
                          lambda wn: invert(hnet.hnet, wn, meta.expand(len(wn), -1))),
            "hvae": Route("hvae", mu, vae.decode, mu.mean(0), data.norm, lambda wn: vae.encode(wn)[0]),
        }

    @cached_property
    def hyperclips(self) -> dict[str, HyperCLIP]:
        """HyperCLIP per route (see pipelines.hyperclip for what each was trained on)."""
        state, cfg = self._load("hyperclip")
        out = {}
        for r in ROUTES:
            m = HyperCLIP(self.data.layout.size, self.data.train.c.shape[1], tuple(cfg["hidden"]))
            m.load_state_dict(sub_state(state, r))
            out[r] = m.eval().requires_grad_(False)
        return out

    @cached_property
    def hyperldms(self) -> dict:
        """HyperLDM per route (EMA denoiser + latent standardiser + schedule)."""
        from models.diffusion import Diffusion, Standardizer
        from models.zeroshot.denoiser import LatentDenoiser
        from models.zeroshot.training import HyperLDM

        state, cfg = self._load("hyperldm")
        d_latent = self.routes["hnet"].z_train.shape[1]
        out = {}
        for r in ROUTES:
            den = LatentDenoiser(d_latent, self.data.train.c.shape[1], hidden=cfg["hidden"], drop_prob=cfg["drop_prob"])
            den.load_state_dict(sub_state(state, f"{r}.denoiser"))
            std = Standardizer(d_latent)
            std.load_state_dict(sub_state(state, f"{r}.standardizer"))
            out[r] = HyperLDM(den.eval().requires_grad_(False), std, Diffusion(cfg["timesteps"], cfg["schedule"]))
        return out

    @cached_property
    def baselines(self) -> dict[str, torch.nn.Module]:
        """The trained baselines: multitask, text-conditioned HNet, MAML init."""
        data = self.data
        state, cfg = self._load("baselines")
        text = TextHNet(data.norm, data.train.c.shape[1], cfg["d_latent"], tuple(cfg["hidden"]))
        text.load_state_dict(sub_state(state, "text_hnet"))
        out = {"text_hnet": text}
        for name in ("multitask", "maml"):
            m = SharedWeights(torch.zeros(data.layout.size))
            m.load_state_dict(sub_state(state, name))
            out[name] = m
        return {k: m.eval().requires_grad_(False) for k, m in out.items()}
