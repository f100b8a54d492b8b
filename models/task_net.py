"""The task network (the paper's CLIPAdapter) and its flat-weight layout.

An adapter maps an image embedding into the text-embedding space; a task's logits are
`scale * cosine(adapter(x), text(answer prompt))` over its candidate answers (Nava et al. 2023, §4).
Generative models see a task network only as a flat vector `w`; `WeightLayout` fixes the order.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TaskNetSpec:
    """Shape of the adapter: image dim -> hidden -> text dim, and the fixed logit scale."""

    d_img: int = 1280
    hidden: int = 32
    d_txt: int = 384
    logit_scale: float = 10.0


class WeightLayout:
    """Stable map between a flat weight vector `w` and named parameter tensors.

    The order is that of `TaskNetwork.named_parameters()`: fc1.weight [hidden, d_img], fc1.bias [hidden],
    fc2.weight [d_txt, hidden], fc2.bias [d_txt]; each tensor is flattened row-major and concatenated.
    """

    def __init__(self, spec: TaskNetSpec):
        self.spec = spec
        self.shapes: dict[str, tuple[int, ...]] = {
            "fc1.weight": (spec.hidden, spec.d_img),
            "fc1.bias": (spec.hidden,),
            "fc2.weight": (spec.d_txt, spec.hidden),
            "fc2.bias": (spec.d_txt,),
        }
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            self.offsets[name] = (start, start + n)
            start += n
        self.size = start

    @property
    def id(self) -> str:
        """Short id that changes whenever the layout would (stored next to every weight vector)."""
        text = ";".join(f"{k}:{'x'.join(map(str, v))}" for k, v in self.shapes.items())
        return f"adapter-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `w` [..., size] as named tensors [..., *shape]; works under vmap."""
        lead = w.shape[:-1]
        return {
            name: w[..., a:b].reshape(*lead, *self.shapes[name])
            for name, (a, b) in self.offsets.items()
        }

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors [..., *shape] into `w` [..., size] in layout order."""
        parts = []
        for name, shape in self.shapes.items():
            p = params[name]
            parts.append(p.reshape(*p.shape[: p.dim() - len(shape)], -1))
        return torch.cat(parts, dim=-1)


class TaskNetwork(nn.Module):
    """Adapter MLP: image embedding -> ReLU hidden -> text space; cosine logits against answer prompts."""

    def __init__(self, spec: TaskNetSpec = TaskNetSpec()):
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.d_img, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.d_txt)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d_img] -> adapter outputs in text space [n, d_txt]."""
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """x [n, d_img], prompts [a, d_txt] -> logits [n, a] = scale * cosine(embed(x), prompts)."""
        p = {"fc1.weight": self.fc1.weight, "fc1.bias": self.fc1.bias, "fc2.weight": self.fc2.weight, "fc2.bias": self.fc2.bias}
        return adapter_logits(p, x, prompts, self.spec.logit_scale)


def adapter_logits(p: dict[str, torch.Tensor], x: torch.Tensor, prompts: torch.Tensor, scale: float) -> torch.Tensor:
    """The task network as a pure function of its named parameters: x [n, d_img], prompts [a, d_txt] -> [n, a].

    Folds fc2 into the prompts and takes |embed(x)| from the Gram matrix of fc2, so no [n, d_txt]
    tensor is built: the same function as `cosine_logits(embed(x), ...)` with a fraction of the
    elementwise work, which is what bounds a CPU here. Where |embed(x)| < ~1e-2 |fc2 h| (fc2's terms
    nearly cancel) fp32 cannot resolve the Gram sum: the cosine then stays bounded, not exact.
    """
    w2, b2 = p["fc2.weight"], p["fc2.bias"]  # [d_txt, hidden], [d_txt]
    pn = F.normalize(prompts, dim=-1)  # [a, d_txt]
    h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))  # [n, hidden]
    sims = F.linear(h, pn @ w2, pn @ b2)  # <embed(x), pn>: [n, a]
    gram = w2.transpose(-1, -2) @ w2  # [hidden, hidden]
    hgh, bb = ((h @ gram) * h).sum(-1), b2 @ b2  # [n], []
    sq = hgh + 2 * (h @ (b2 @ w2)) + bb  # |embed(x)|^2: [n]
    # When embed(x) nearly cancels (|fc2 h| ~ |b2|, sum ~ 0) this sum loses fp32 precision; a
    # relative floor and the clamp keep the cosine bounded there instead of exploding.
    norm = sq.clamp_min(1e-6 * (hgh + bb) + 1e-24).sqrt().unsqueeze(-1)
    return scale * (sims / norm).clamp(-1.0, 1.0)


def cosine_logits(out: torch.Tensor, prompts: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cosine similarity between adapter outputs [n, d] and prompt embeddings [a, d]."""
    return scale * F.normalize(out, dim=-1) @ F.normalize(prompts, dim=-1).transpose(-1, -2)


def functional_forward(
    layout: WeightLayout, w: torch.Tensor, x: torch.Tensor, prompts: torch.Tensor
) -> torch.Tensor:
    """Task-network logits from a flat weight vector: w [size], x [n, d_img], prompts [a, d_txt] -> [n, a].

    A pure function (the same `adapter_logits` the module runs), so `torch.func.vmap` maps it over a
    batch of weight vectors with nothing to build first.
    """
    return adapter_logits(layout.unflatten(w), x, prompts, layout.spec.logit_scale)


_SKELETONS: dict[TaskNetSpec, TaskNetwork] = {}


def skeleton(spec: TaskNetSpec) -> TaskNetwork:
    """A parameter-free (meta-device) TaskNetwork used only as the code of `functional_call`.

    Build it outside any torch.func transform: construction runs nn.Linear's (random) init.
    """
    if spec not in _SKELETONS:
        with torch.device("meta"):
            _SKELETONS[spec] = TaskNetwork(spec)
    return _SKELETONS[spec]


def init_weights(spec: TaskNetSpec, seed: int) -> torch.Tensor:
    """PyTorch-default initialisation of a task network from `seed`, as a flat vector."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        net = TaskNetwork(spec)
    layout = WeightLayout(spec)
    return layout.flatten({k: v.detach() for k, v in net.named_parameters()}).clone()


def masked_logits(logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Push padded answer slots to -inf so tasks with fewer candidates share one padded tensor."""
    return logits.masked_fill(~answer_mask, float("-inf"))
