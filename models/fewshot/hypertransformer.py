"""HyperTransformer (Zhmoginov et al., ICML 2022): a transformer reads the support set and writes the weights.

Tokens (§3): one per support example, the sample embedding ⊕ its label embedding, plus learnable
weight-slice tokens; a small transformer encoder (3 layers) mixes them and each weight-slice token's
output is decoded to one slice of the task network. As in the paper, slices follow a layer's output
units: for fc1 one token per hidden unit (its incoming row and bias), for the classifier one token
per class. `layers="last"` generates only the classifier (the paper's cheaper last-layer variant),
`layers="all"` also a residual on fc1.

Adaptations to this task network (see models.fewshot.support for the measurements behind them):
- The classifier is fc2 followed by cosine similarity with each answer's prompt p_c, so class c's
  effective weight row is r_c = fc2ᵀ p̂_c; class rows map back to fc2 with `support.head_update`.
- A sample's embedding is the frozen extractor's hidden features h = relu(fc1 x) (fc1 pretrained on
  all meta-train tasks, `set_extractor`); its label embedding is a projection of the answer's text
  embedding, since answers differ from task to task. Class tokens carry their answer's text and the
  class mean of h.
- Readout: class c's row is Δr_c = g Σ_i α_ci h_i / n + γ (class mean of h − their average), with
  α_ci the dot product of class token c's and support token i's outputs. The generated row stays in
  the span of the support features (the paper notes the generated last layer acts like a prototype
  classifier), so a concept never seen in meta-training still gets a row made of its own features.
- During meta-training the transformer sees h in a random orthonormal basis per episode, so it
  cannot learn the meta-train concepts' feature directions (it overfit them without this).
- Generated weights are a residual on a meta-learned base w0 (its fc1: the frozen extractor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fewshot.episodes import EpisodeBatch, batch_accuracy
from models.fewshot.maml import query_loss
from models.fewshot.support import class_means, PretrainedExtractor, head_update, hidden_features, prototypes, random_rotation
from models.task_net import TaskNetSpec, WeightLayout, init_weights

LAYERS = ("all", "last")


class HyperTransformer(PretrainedExtractor, nn.Module):
    """Support tokens + weight-slice tokens -> TransformerEncoder -> task-network weights (residual on w0)."""

    def __init__(
        self, spec: TaskNetSpec, layers: str = "last", d_model: int = 64, n_layers: int = 3, n_heads: int = 4,
        max_answers: int = 8, init_gain: float = 0.3, rotate: bool = True, seed: int = 0,
    ):
        super().__init__()
        if layers not in LAYERS:
            raise ValueError(f"layers={layers!r}: choose one of {LAYERS}")
        self.layout, self.layers, self.max_answers, self.rotate = WeightLayout(spec), layers, max_answers, rotate
        s = spec
        self.w0 = nn.Parameter(init_weights(spec, seed))  # the base network [P]
        self.frozen_extractor = False  # set by `set_extractor`: fc1 of w0 then gets no gradient
        self.sample_proj = nn.Linear(s.hidden, d_model)  # sample embedding from h
        self.mean_proj = nn.Linear(s.hidden, d_model)  # class token: its class mean of h
        self.prompt_proj = nn.Linear(s.d_txt, d_model)  # label embedding from the answer's text
        self.kind = nn.Parameter(0.02 * torch.randn(2, d_model))  # marks support vs class tokens
        self.unit_tokens = nn.Parameter(0.02 * torch.randn(s.hidden, d_model)) if layers == "all" else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.query, self.key = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)  # α_ci readout
        self.bias_head = nn.Linear(d_model, 1)  # Δβ_c from class token c
        self.unit_head = nn.Linear(d_model, s.d_img + 1) if layers == "all" else None  # fc1 row j ⊕ bias j
        # Output gains (fc1, classifier): the residual starts at init_gain times a unit-scale output;
        # the prototype's gain γ starts at 1 (a working nearest-mean head before any meta-training).
        self.gain = nn.Parameter(torch.full((2,), init_gain))
        self.proto_gain = nn.Parameter(torch.tensor(1.0))

    def tokens(self, batch: EpisodeBatch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[support; class; unit] tokens [B, n_s + a (+ hidden), d_model] and the key padding mask (True = ignore)."""
        B, a = batch.prompts.shape[:2]
        if a > self.max_answers:
            raise ValueError(f"an episode has {a} candidate answers; built for at most {self.max_answers}")
        if self.training and self.rotate:
            h = random_rotation(h)  # the transformer's view only; the readout uses the real h
        pe = self.prompt_proj(F.normalize(batch.prompts, dim=-1))  # [B, a, d_model]
        lab = torch.gather(pe, 1, batch.y_s[..., None].expand(-1, -1, pe.shape[-1]))  # [B, n_s, d_model]
        sup = self.sample_proj(h) + lab + self.kind[0]  # [B, n_s, d_model]
        cls = pe + self.mean_proj(class_means(h, batch)[0]) + self.kind[1]  # [B, a, d_model]
        parts, pads = [sup, cls], [~batch.m_s, ~batch.answer_mask]
        if self.unit_tokens is not None:
            parts.append(self.unit_tokens.expand(B, -1, -1))
            pads.append(torch.zeros(B, len(self.unit_tokens), dtype=torch.bool))
        return torch.cat(parts, 1), torch.cat(pads, 1)

    def forward_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """Generated weights w [B, P]: w0 plus the class rows read out of the support tokens."""
        s = self.layout.spec
        B, a = batch.prompts.shape[:2]
        n_s = batch.x_s.shape[1]
        w0 = self.base()
        h = hidden_features(self.layout, w0, batch.x_s)  # [B, n_s, hidden]
        x, pad = self.tokens(batch, h)
        out = self.norm(self.encoder(x, src_key_padding_mask=pad))  # [B, n_tokens, d_model]
        cls_out, sup_out = out[:, n_s: n_s + a], out[:, :n_s]
        alpha = torch.einsum("bcd,bnd->bcn", self.query(cls_out), self.key(sup_out)) / self.query.out_features ** 0.5
        alpha = alpha * batch.m_s[:, None, :] / batch.m_s.sum(1).clamp_min(1)[:, None, None]  # [B, a, n_s]
        rows = self.gain[1] * torch.einsum("bcn,bnh->bch", alpha, h) + self.proto_gain * prototypes(h, batch)
        amask = batch.answer_mask.to(h.dtype)
        d_w2, d_b2 = head_update(batch.prompts, rows * amask[..., None], self.gain[1] * self.bias_head(cls_out)[..., 0] * amask)
        p = {k: v.expand(B, *v.shape) for k, v in self.layout.unflatten(w0).items()}
        new = {"fc2.weight": p["fc2.weight"] + d_w2, "fc2.bias": p["fc2.bias"] + d_b2}
        if self.layers == "all":
            u = self.unit_head(out[:, n_s + a:])  # [B, hidden, d_img + 1]
            g1 = self.gain[0] / s.d_img ** 0.5  # nn.Linear's init scale for fc1 (fan-in = d_img)
            new["fc1.weight"] = p["fc1.weight"] + g1 * u[..., : s.d_img]
            new["fc1.bias"] = p["fc1.bias"] + g1 * u[..., -1]
        return self.layout.flatten({**p, **new})

    def adapt(self, batch: EpisodeBatch) -> torch.Tensor:
        """Task weights for every episode [B, P] (one forward pass: no inner loop)."""
        return self.forward_weights(batch)

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        """Meta-training loss: mean query cross-entropy of the generated weights."""
        return query_loss(self.layout, self.adapt(batch), batch)

    @torch.no_grad()
    def accuracy(self, batch: EpisodeBatch) -> torch.Tensor:
        """Query accuracy of each episode [B]."""
        return batch_accuracy(self.layout, self.adapt(batch), *batch.query())
