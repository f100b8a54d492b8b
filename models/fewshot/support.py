"""Support-set helpers shared by the hypernetwork methods (HyperMAML, HyperTransformer). Pure torch.

Both generate the classifier head (fc2) on top of a frozen extractor (fc1) and read the support set in
the task network's own representation, the hidden features h = relu(fc1 x). Two measured lessons from
the compositional easyvqa split (held-out concepts gray, teal, triangle) shape what is here:
- A jointly meta-learned fc1 co-adapts to the meta-train concepts (its held-out-concept test accuracy
  fell to chance while meta-train accuracy rose), so fc1 comes from multitask pretraining and stays
  frozen, as MetaDiff's extractor does (`PretrainedExtractor`).
- A hypernetwork that sees h learns concept-specific maps; showing it h in a random orthonormal basis
  per episode during meta-training (`random_rotation`) leaves only what is true in every basis
  (distances, angles, labels) to learn from, and the head it writes is built from the real h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.fewshot.episodes import EpisodeBatch
from models.task_net import WeightLayout


def hidden_features(layout: WeightLayout, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """relu(fc1 x) of weights w [P] for x [..., d_img] -> [..., hidden]."""
    p = layout.unflatten(w)
    return F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))


def class_means(h: torch.Tensor, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of support features h [B, n_s, d] -> ([B, a, d], present [B, a] float: class has shots)."""
    member = F.one_hot(batch.y_s, batch.prompts.shape[1]).to(h.dtype) * batch.m_s[..., None]  # [B, n_s, a]
    count = member.sum(1)  # [B, a]
    return torch.einsum("bnc,bnd->bcd", member, h) / count.clamp_min(1.0)[..., None], (count > 0).to(h.dtype)


def prototypes(h: torch.Tensor, batch: EpisodeBatch) -> torch.Tensor:
    """Class means centred on their average over the classes present [B, a, d] (absent classes: 0)."""
    mean, present = class_means(h, batch)
    centre = (mean * present[..., None]).sum(1, keepdim=True) / present.sum(1).clamp_min(1.0)[:, None, None]
    return (mean - centre) * present[..., None]


def random_rotation(h: torch.Tensor) -> torch.Tensor:
    """h [B, n, d] in a Haar-random orthonormal basis per episode (QR of a Gaussian, signs fixed)."""
    B, _, d = h.shape
    q, r = torch.linalg.qr(torch.randn(B, d, d, dtype=h.dtype))
    return h @ (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :])


def head_update(prompts: torch.Tensor, rows: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class rows Δr [B, a, hidden] and biases Δβ [B, a] -> (ΔW [B, d_txt, hidden], Δb [B, d_txt]).

    Class c's effective classifier row is fc2ᵀ p̂_c (logits are cosines with the answer prompt p_c),
    so a row change Δr_c maps back to fc2 as p̂_c Δr_cᵀ (and Δβ_c to p̂_c Δβ_c), summed over classes.
    """
    pn = F.normalize(prompts, dim=-1)  # [B, a, d_txt]
    return torch.einsum("bcd,bch->bdh", pn, rows), torch.einsum("bcd,bc->bd", pn, biases)


class PretrainedExtractor:
    """Mixin for a model whose base weights `w0` [P] can start at a pretrained network with fc1 frozen.

    The model sets `self.w0` (a parameter), `self.layout` and `self.frozen_extractor = False`.
    """

    @torch.no_grad()
    def set_extractor(self, w: torch.Tensor) -> None:
        """Start w0 at pretrained weights w [P] and freeze their fc1 (the shared extractor)."""
        self.w0.copy_(w)
        self.frozen_extractor = True

    def base(self) -> torch.Tensor:
        """w0 [P], with fc1 detached once the extractor is frozen (the pretrained extractor gets no gradient)."""
        if not self.frozen_extractor:
            return self.w0
        n = self.layout.offsets["fc1.bias"][1]  # fc1.weight and fc1.bias come first in the layout
        return torch.cat([self.w0[:n].detach(), self.w0[n:]])