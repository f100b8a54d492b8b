"""HyperMAML (Przewięźlikowski et al., "HyperMAML: Few-Shot Adaptation of Deep Models with Hypernetworks").

The task weights are θ' = θ − Δθ, where Δθ is produced by a hypernetwork from the support set instead
of by gradient descent (§4). As in the paper's main variant, only the classifier head is updated:
here the adapter's last layer, fc2 (weight and bias); fc1 is meta-learned and shared, like the
paper's feature extractor. The hypernetwork's input per support example is the paper's "enhanced
embedding": the example's embedding (the adapter's hidden activation relu(fc1 x)) ⊕ the softmax of
the current classifier (the universal weights θ) ⊕ the one-hot label, aggregated per class.

Adaptations to this task network, which the paper's N-way classifier does not have:
- The number of candidate answers varies (2, 3 or 8) and classes may have different shot counts, so
  instead of concatenating the support examples in class order (a fixed N·K input), the enhanced
  embeddings are averaged per class and the classes are processed as a set (a shared per-class MLP,
  a pooled context, DeepSets-style). Softmax and one-hot vectors are padded to `max_answers`.
- A class's classifier weights here are its answer-prompt embedding, which changes from task to
  task (the paper's head rows are universal, so its hypernetwork knows them implicitly); so each
  class token also carries its normalised prompt.
- fc2 is not per-class: each class token emits a rank-1 update u_c v_cᵀ of fc2.weight [d_txt, hidden]
  plus a bias update b_c; Δθ sums them over the classes that have support examples.

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
from models.hnet import mlp
from models.task_net import TaskNetSpec, WeightLayout, init_weights


class ClassUpdateNet(nn.Module):
    """Per-class enhanced embeddings [B, a, d_in] -> (ΔW [B, d_txt, hidden], Δb [B, d_txt])."""

    def __init__(self, d_in: int, spec: TaskNetSpec, width: int = 256, init_scale: float = 1.0):
        super().__init__()
        self.spec = spec
        self.token = mlp([d_in, width, width])  # each class on its own
        self.out = mlp([2 * width, width, 2 * spec.d_txt + spec.hidden])  # class ⊕ pooled context -> u, b, v
        with torch.no_grad():  # a small update at init: training starts near the MAML/θ solution
            self.out[-1].weight.mul_(init_scale)
            self.out[-1].bias.zero_()

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, a, d_in]; present [B, a] bool (class has support examples) -> (ΔW, Δb)."""
        s = self.spec
        h = F.relu(self.token(tokens))  # [B, a, width]
        pm = present.to(h.dtype)[..., None]  # [B, a, 1]
        ctx = (h * pm).sum(1, keepdim=True) / pm.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1, width]
        o = self.out(torch.cat([h, ctx.expand_as(h)], -1)) * pm  # [B, a, 2 d_txt + hidden]; absent classes -> 0
        u, b, v = o.split([s.d_txt, s.d_txt, s.hidden], dim=-1)
        dW = torch.einsum("bcd,bch->bdh", u, v)  # sum of rank-1 updates u_c v_cᵀ: [B, d_txt, hidden]
        return dW, b.sum(1)  # [B, d_txt]


class HyperMAML(nn.Module):
    """Universal weights θ = `w0` and a hypernetwork that maps a support set to the head update Δθ."""

    def __init__(
        self, spec: TaskNetSpec, max_answers: int = 8, warmup_steps: int = 5, warmup_lr: float = 0.01,
        first_order: bool = False, width: int = 256, seed: int = 0,
    ):
        super().__init__()
        self.layout = WeightLayout(spec)
        self.max_answers = max_answers
        self.warmup_steps, self.warmup_lr, self.first_order = warmup_steps, warmup_lr, first_order
        self.w0 = nn.Parameter(init_weights(spec, seed))  # θ [P]
        self.hyper = ClassUpdateNet(spec.hidden + 2 * max_answers + spec.d_txt, spec, width)
        # β: 0 = pure MAML warm-up update, 1 = pure hypernetwork update; set by the training loop.
        self.register_buffer("blend", torch.tensor(1.0))

    def enhanced_embeddings(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean of [relu(fc1 x) ⊕ softmax_θ ⊕ one-hot] ⊕ class prompt -> ([B, a, d_in], present [B, a])."""
        A = self.max_answers
        a = batch.prompts.shape[1]
        if a > A:
            raise ValueError(f"an episode has {a} candidate answers; HyperMAML was built for at most {A}")
        p = self.layout.unflatten(self.w0)
        emb = F.relu(F.linear(batch.x_s, p["fc1.weight"], p["fc1.bias"]))  # [B, n_s, hidden]
        logits = torch.func.vmap(lambda x, pr, am: task_logits(self.layout, self.w0, x, pr, am))(
            batch.x_s, batch.prompts, batch.answer_mask)  # [B, n_s, a]
        probs = F.pad(logits.softmax(-1), (0, A - a))  # [B, n_s, A]
        onehot = F.one_hot(batch.y_s, A).to(emb.dtype)  # [B, n_s, A]
        enh = torch.cat([emb, probs, onehot], -1) * batch.m_s[..., None]  # padding rows -> 0
        member = F.one_hot(batch.y_s, a).to(emb.dtype) * batch.m_s[..., None]  # [B, n_s, a]
        count = member.sum(1)  # [B, a] shots per class
        per_class = torch.einsum("bnc,bnd->bcd", member, enh) / count.clamp_min(1.0)[..., None]  # [B, a, d]
        prompts = F.normalize(batch.prompts, dim=-1)  # [B, a, d_txt]
        return torch.cat([per_class, prompts], -1), (count > 0) & batch.answer_mask

    def hyper_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """θ − Δθ for each episode [B, P]: Δθ is zero outside fc2."""
        dW, db = self.hyper(*self.enhanced_embeddings(batch))
        B = len(batch)
        p = {k: v.expand(B, *v.shape) for k, v in self.layout.unflatten(self.w0).items()}
        return self.layout.flatten({**p, "fc2.weight": p["fc2.weight"] - dW, "fc2.bias": p["fc2.bias"] - db})

    def maml_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """The warm-up update: MAML on the head (fc2) from θ [B, P]."""
        return maml_adapt(self.layout, self.w0, batch, self.warmup_steps, self.warmup_lr, self.first_order, "last")

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
