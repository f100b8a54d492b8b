"""Trained zero-shot models read back from a run, and the methods that turn descriptions into weights.

A *route* is a latent space with a decoder to weights: `hnet` (HNet latents, adapted per task from the
meta latent) or `hvae` (HVAE posterior means of the experts). HyperCLIP and HyperLDM are trained per
route; `generate` runs any method of the results table for a batch of description embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from models.zeroshot.hvae import HVAE
from models.zeroshot.hyperclip import HyperCLIP, guide
from models.weight_norm import WeightNormalizer
from models.zeroshot.training import LatentHNet, SharedWeights, TextHNet
from pipelines.zeroshot.data import SplitData, load_model, model_path

ROUTES = ("hnet", "hvae")


@dataclass
class Route:
    """A latent space of task networks: training latents, a decoder to normalised weights, a start point."""

    name: str
    z_train: torch.Tensor  # [N, d] latents of the meta-train tasks
    decode_n: Callable[[torch.Tensor], torch.Tensor]  # z [B, d] -> normalised weights [B, P]
    z_start: torch.Tensor  # [d] where HyperCLIP guidance starts (the meta latent / the experts' mean latent)
    norm: WeightNormalizer

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, d] -> raw task-network weights [B, P]."""
        return self.norm.decode(self.decode_n(z))


def sub_state(state: dict, prefix: str) -> dict:
    """Entries of `state` under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_routes(run_dir, data: SplitData, seed: int) -> dict[str, Route]:
    """The HNet and HVAE routes trained by the generators stage for this split and seed."""
    state, side = load_model(model_path(run_dir, "generators", data.name, seed))
    cfg = side["stage_config"]
    hidden = tuple(cfg["hidden"])
    hnet = LatentHNet(data.norm, data.train.batch.n, cfg["d_latent"], hidden, torch.Generator())
    hnet.load_state_dict(sub_state(state, "hnet"))
    vae = HVAE(data.layout.size, cfg["d_latent"], hidden)
    vae.load_state_dict(sub_state(state, "hvae"))
    for m in (hnet, vae):
        m.eval().requires_grad_(False)
    mu = state["hvae_latents"]
    return {
        "hnet": Route("hnet", hnet.latents.z.detach(), hnet.hnet, hnet.latents.meta.detach(), hnet.norm),
        "hvae": Route("hvae", mu, vae.decode, mu.mean(0), data.norm),
    }


def load_hyperclip(run_dir, data: SplitData, seed: int) -> dict[str, HyperCLIP]:
    """HyperCLIP per route (see pipelines.hyperclip for what each was trained on)."""
    state, side = load_model(model_path(run_dir, "hyperclip", data.name, seed))
    hidden = tuple(side["stage_config"]["hidden"])
    out = {}
    for r in ROUTES:
        m = HyperCLIP(data.layout.size, data.train.c.shape[1], hidden)
        m.load_state_dict(sub_state(state, r))
        out[r] = m.eval().requires_grad_(False)
    return out


def load_hyperldm(run_dir, data: SplitData, seed: int, d_latent: int):
    """HyperLDM per route (EMA denoiser + latent standardiser + schedule)."""
    from models.zeroshot.denoiser import LatentDenoiser
    from models.diffusion import Diffusion, Standardizer
    from models.zeroshot.training import HyperLDM

    state, side = load_model(model_path(run_dir, "hyperldm", data.name, seed))
    cfg = side["stage_config"]
    out = {}
    for r in ROUTES:
        den = LatentDenoiser(d_latent, data.train.c.shape[1], hidden=cfg["hidden"], drop_prob=cfg["drop_prob"])
        den.load_state_dict(sub_state(state, f"{r}.denoiser"))
        std = Standardizer(d_latent)
        std.load_state_dict(sub_state(state, f"{r}.standardizer"))
        out[r] = HyperLDM(den.eval().requires_grad_(False), std, Diffusion(cfg["timesteps"], cfg["schedule"]))
    return out


def load_baselines(run_dir, data: SplitData, seed: int) -> dict[str, torch.nn.Module]:
    """The trained baselines: multitask, text-conditioned HNet, MAML init."""
    state, side = load_model(model_path(run_dir, "baselines", data.name, seed))
    cfg = side["stage_config"]
    text = TextHNet(data.norm, data.train.c.shape[1], cfg["d_latent"], tuple(cfg["hidden"]))
    text.load_state_dict(sub_state(state, "text_hnet"))
    out = {"text_hnet": text}
    for name in ("multitask", "maml"):
        m = SharedWeights(torch.zeros(data.layout.size))
        m.load_state_dict(sub_state(state, name))
        out[name] = m
    return {k: m.eval().requires_grad_(False) for k, m in out.items()}


@dataclass(frozen=True)
class Sampling:
    """How generative methods sample: HyperCLIP guidance steps/lr/L2 and HyperLDM sampler settings."""

    guidance_steps: int = 50
    guidance_lr: float = 3e-2
    guidance_l2: float = 0.0
    sampler: str = "ddim"
    sampler_steps: int = 50


def nearest_task(data: SplitData, c: torch.Tensor) -> torch.Tensor:
    """Baseline: the expert of the meta-train task whose description embedding is nearest (cosine) -> [B, P]."""
    sim = F.normalize(c, dim=-1) @ F.normalize(data.train.c, dim=-1).T  # [B, N]
    return data.w_train[sim.argmax(1)]


def hyperclip_weights(route: Route, clip: HyperCLIP, c: torch.Tensor, s: Sampling) -> torch.Tensor:
    """HyperCLIP guidance (§3.3) from the route's start latent -> raw weights [B, P]."""
    z0 = route.z_start.expand(len(c), -1)
    z = guide(z0, route.decode_n, clip, c, steps=s.guidance_steps, lr=s.guidance_lr, l2=s.guidance_l2)
    return route.decode(z)


def hyperldm_weights(route: Route, ldm, c: torch.Tensor, gamma: float, s: Sampling, seed: int) -> torch.Tensor:
    """HyperLDM sampling with classifier-free guidance scale gamma -> raw weights [B, P]."""
    gen = torch.Generator().manual_seed(seed)
    z = ldm.sample(c, gamma, sampler=s.sampler, steps=s.sampler_steps, generator=gen)
    with torch.no_grad():
        return route.decode(z)


METHODS = ("hnet_hyperldm", "hvae_hyperldm", "hnet_hyperclip", "hvae_hyperclip", "text_hnet", "multitask",
           "maml_zero_shot", "nearest_task")


def generate(method: str, data: SplitData, seed: int, c: torch.Tensor, s: Sampling, gamma: float = 1.0) -> torch.Tensor:
    """Raw weights [B, P] from one method of a trained run for description embeddings c [B, d_txt]."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "nearest_task":
        return nearest_task(data, c)
    rows = torch.arange(len(c))
    if method in ("text_hnet", "multitask", "maml_zero_shot"):
        model = load_baselines(data.run_dir, data, seed)["maml" if method == "maml_zero_shot" else method]
        with torch.no_grad():
            return model(rows, c)
    route_name, kind = method.split("_", 1)
    route = load_routes(data.run_dir, data, seed)[route_name]
    if kind == "hyperclip":
        return hyperclip_weights(route, load_hyperclip(data.run_dir, data, seed)[route_name], c, s)
    ldm = load_hyperldm(data.run_dir, data, seed, route.z_train.shape[1])[route_name]
    return hyperldm_weights(route, ldm, c, gamma, s, seed)
