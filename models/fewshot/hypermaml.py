"""HyperMAML (Przewięźlikowski et al., "HyperMAML: Few-Shot Adaptation of Deep Models with Hypernetworks").

The task weights are θ' = θ − Δθ, where Δθ is produced by a hypernetwork from the support set instead
of by gradient descent (§4). As in the paper's main variant, only the classifier head is updated:
here the adapter's last layer, fc2 (weight and bias), on top of a frozen extractor fc1 pretrained on
all meta-train tasks (`set_extractor`; see models.fewshot.support for why it is not meta-learned
here). The hypernetwork's input per support example is the paper's "enhanced embedding": the
example's embedding (the hidden features h = relu(fc1 x)) ⊕ the softmax of the current classifier
(the universal weights θ) ⊕ the one-hot label.

Adaptations to this task network, which the paper's N-way classifier does not have:
- The number of candidate answers varies (2, 3 or 8) and classes may have different shot counts, so
  instead of concatenating the support examples in class order (a fixed N·K input), the examples
  are a set (a shared per-example MLP and a pooled context, DeepSets-style); softmax and one-hot
  vectors are padded to `max_answers`.
- Output: a coefficient pair (a_ic, b_ic) per support example i and class c, and the head update
  Δr_c = Σ_i a_ic h_i / n, Δβ_c = Σ_i b_ic / n: the form of the head's own gradient, Σ_i (p_ic − y_ic)
  h_i / n, with learned coefficients; class rows map to fc2 through the answers' prompts
  (`support.head_update`), since a class's classifier here is its answer's text embedding.
- During meta-training the hypernetwork sees h in a random orthonormal basis per episode (the
  update itself is built from the real h), so it cannot learn the meta-train concepts' directions.

Warm-up (paper §4.3): training starts from MAML's update (on the same head, `warmup_steps` steps of
`warmup_lr`) and blends linearly into the hypernetwork's: θ' = (1 − β) θ'_MAML + β (θ − Δθ), with β
raised from 0 to 1 by the training loop. Unlike the reference code, whose warm-up never reassigns its
fast weights (so every MAML step after the first takes its gradient at θ), the warm-up here is
`models.fewshot.maml.inner_adapt`: each step's gradient is taken at the previous step's weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fewshot.episodes import EpisodeBatch, batch_accuracy, task_logits
from models.fewshot.maml import adapt as maml_adapt
from models.fewshot.maml import query_loss
from models.fewshot.support import PretrainedExtractor, head_update, hidden_features, random_rotation
from models.layers import mlp
from models.task_net import TaskNetSpec, WeightLayout, init_weights


class CoefficientNet(nn.Module):
    """Enhanced embeddings -> per-(example, class) coefficients (a_ic, b_ic) of the head update.

    Each example's enhanced embedding goes through a shared MLP; a pooled context (DeepSets) joins
    it, and for every candidate class c the pair (example i, class c) also sees p_ic and y_ic (the
    two numbers a gradient step would combine), so the net is the same for 2, 3 or 8 answers.
    """

    def __init__(self, d_in: int, width: int = 128):
        super().__init__()
        self.token = mlp([d_in, width, width])
        self.pair = mlp([2 * width + 2, width, 2])
        with torch.no_grad():  # zero update at init: training starts at the MAML warm-up / θ
            self.pair[-1].weight.zero_()
            self.pair[-1].bias.zero_()

    def forward(self, enh: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """enh [B, n, d_in], probs/onehot [B, n, a], m [B, n] bool -> coefficients [B, n, a, 2] (0 on padding rows)."""
        z = F.relu(self.token(enh))  # [B, n, width]
        mf = m.to(z.dtype)[..., None]
        ctx = (z * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1, width]
        a = probs.shape[-1]
        zc = torch.cat([z, ctx.expand_as(z)], -1)[:, :, None].expand(-1, -1, a, -1)  # [B, n, a, 2 width]
        return self.pair(torch.cat([zc, probs[..., None], onehot[..., None]], -1)) * mf[..., None]


class HyperMAML(PretrainedExtractor, nn.Module):
    """Universal weights θ = `w0` and a hypernetwork that maps a support set to the head update Δθ."""

    def __init__(
        self, spec: TaskNetSpec, max_answers: int = 8, warmup_steps: int = 5, warmup_lr: float = 0.01,
        first_order: bool = False, width: int = 128, rotate: bool = True, seed: int = 0,
    ):
        super().__init__()
        self.layout = WeightLayout(spec)
        self.max_answers, self.rotate = max_answers, rotate
        self.warmup_steps, self.warmup_lr, self.first_order = warmup_steps, warmup_lr, first_order
        self.w0 = nn.Parameter(init_weights(spec, seed))  # θ [P]
        self.frozen_extractor = False  # set by `set_extractor`: fc1 of θ then gets no gradient
        self.hyper = CoefficientNet(spec.hidden + 2 * max_answers, width)
        # β: 0 = pure MAML warm-up update, 1 = pure hypernetwork update; set by the training loop.
        self.register_buffer("blend", torch.tensor(1.0))

    def update(self, batch: EpisodeBatch, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Δθ of the head from the enhanced embeddings [h ⊕ softmax_θ ⊕ one-hot]: (ΔW [B, d_txt, hidden], Δb [B, d_txt])."""
        A = self.max_answers
        a = batch.prompts.shape[1]
        if a > A:
            raise ValueError(f"an episode has {a} candidate answers; HyperMAML was built for at most {A}")
        h = hidden_features(self.layout, w0, batch.x_s)  # [B, n_s, hidden]
        logits = torch.func.vmap(lambda x, pr, am: task_logits(self.layout, w0, x, pr, am))(
            batch.x_s, batch.prompts, batch.answer_mask)  # [B, n_s, a]
        probs = logits.softmax(-1)
        onehot = F.one_hot(batch.y_s, a).to(h.dtype)  # [B, n_s, a]
        view = random_rotation(h) if self.training and self.rotate else h  # the hypernetwork's view only
        enh = torch.cat([view, F.pad(probs, (0, A - a)), F.pad(onehot, (0, A - a))], -1)  # [B, n_s, d_in]
        coef = self.hyper(enh, probs, onehot, batch.m_s)  # [B, n_s, a, 2]
        n = batch.m_s.sum(1).clamp_min(1)[:, None, None]  # [B, 1, 1]
        rows = torch.einsum("bnc,bnh->bch", coef[..., 0], h) / n  # Σ_i a_ic h_i / n: in the span of the support
        amask = batch.answer_mask.to(h.dtype)
        return head_update(batch.prompts, rows * amask[..., None], coef[..., 1].sum(1) / n[..., 0] * amask)

    def hyper_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """θ − Δθ for each episode [B, P]: Δθ is zero outside fc2."""
        w0 = self.base()
        dW, db = self.update(batch, w0)
        B = len(batch)
        p = {k: v.expand(B, *v.shape) for k, v in self.layout.unflatten(w0).items()}
        return self.layout.flatten({**p, "fc2.weight": p["fc2.weight"] - dW, "fc2.bias": p["fc2.bias"] - db})

    def maml_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """The warm-up update: MAML on the head (fc2) from θ [B, P]."""
        return maml_adapt(self.layout, self.base(), batch, self.warmup_steps, self.warmup_lr, self.first_order, "last")

    def adapt(self, batch: EpisodeBatch) -> torch.Tensor:
        """θ' = lerp(θ'_MAML, θ − Δθ, β) [B, P]; β = 0 returns MAML's weights bit for bit, β = 1 skips MAML."""
        beta = float(self.blend)
        if beta >= 1.0:
            return self.hyper_weights(batch)
        # lerp computes start + β (end − start) for β < 0.5, so β = 0 gives exactly θ'_MAML.
        return torch.lerp(self.maml_weights(batch), self.hyper_weights(batch), self.blend)

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Meta-training loss: mean query cross-entropy of the adapted weights."""
        return query_loss(self.layout, self.adapt(batch), batch)

    @torch.no_grad()
    def accuracy(self, batch: EpisodeBatch) -> torch.Tensor:
        """Query accuracy of each episode [B]."""
        return batch_accuracy(self.layout, self.adapt(batch), *batch.query())
