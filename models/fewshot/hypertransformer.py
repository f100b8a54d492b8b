"""HyperTransformer (Zhmoginov et al., ICML 2022): a transformer reads the support set and writes the weights.

Tokens (§3): one per support example, the sample embedding ⊕ its label embedding, plus learnable
weight-slice tokens; a small transformer encoder (3 layers) mixes them and each weight-slice token's
output is decoded to one slice of the task network. As in the paper, slices follow a layer's output
units: for fc1 one token per hidden unit (its incoming row and bias), for the classifier one token
per class. `layers="last"` generates only the classifier (the paper's cheaper last-layer variant;
fc1 is then one learned shared parameter), `layers="all"` both.

Adaptations to this task network:
- The classifier is fc2 followed by cosine similarity with each answer's prompt p_c, so class c's
  effective weight row is r_c = fc2ᵀ p̂_c (and bias p̂_c·b). A class token emits a row residual Δr_c
  [hidden] and a bias residual Δβ_c, mapped back to fc2 as ΔW = Σ_c p̂_c Δr_cᵀ, Δb = Σ_c p̂_c Δβ_c.
- Label embeddings are a learned embedding of the answer index plus a projection of that answer's
  prompt: answers differ from task to task, and a class's meaning is its prompt.
- A sample's embedding is a projection of its image feature plus a projection of the base network's
  hidden activations relu(fc1 x): the tokens that generate the classifier carry the features it reads.
- Generated weights are a residual on a learned base w0 with learned per-layer output gains that
  start small, so training starts from a working network (w0) and the transformer learns offsets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fewshot.episodes import EpisodeBatch, batch_accuracy
from models.fewshot.maml import query_loss
from models.task_net import TaskNetSpec, WeightLayout, init_weights

LAYERS = ("all", "last")


class HyperTransformer(nn.Module):
    """Support tokens + weight-slice tokens -> TransformerEncoder -> task-network weights (residual on w0)."""

    def __init__(
        self, spec: TaskNetSpec, layers: str = "last", d_model: int = 64, n_layers: int = 3, n_heads: int = 4,
        max_answers: int = 8, init_gain: float = 0.3, seed: int = 0,
    ):
        super().__init__()
        if layers not in LAYERS:
            raise ValueError(f"layers={layers!r}: choose one of {LAYERS}")
        self.layout, self.layers, self.max_answers = WeightLayout(spec), layers, max_answers
        s = spec
        self.w0 = nn.Parameter(init_weights(spec, seed))  # the base network [P]
        self.sample_proj = nn.Linear(s.d_img, d_model)
        self.hidden_proj = nn.Linear(s.hidden, d_model)
        self.label_emb = nn.Embedding(max_answers, d_model)
        self.prompt_proj = nn.Linear(s.d_txt, d_model)
        self.kind = nn.Parameter(0.02 * torch.randn(2, d_model))  # marks support vs class tokens
        self.unit_tokens = nn.Parameter(0.02 * torch.randn(s.hidden, d_model)) if layers == "all" else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, s.hidden + 1)  # Δr_c ⊕ Δβ_c
        self.unit_head = nn.Linear(d_model, s.d_img + 1) if layers == "all" else None  # fc1 row j ⊕ bias j
        # Output gains (fc1, classifier): the residual starts at init_gain times a unit-scale output.
        self.gain = nn.Parameter(torch.full((2,), init_gain))

    def tokens(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[support; class; unit] tokens [B, n_s + a (+ hidden), d_model] and the key padding mask (True = ignore)."""
        B, a = batch.prompts.shape[:2]
        if a > self.max_answers:
            raise ValueError(f"an episode has {a} candidate answers; built for at most {self.max_answers}")
        pe = self.prompt_proj(F.normalize(batch.prompts, dim=-1))  # [B, a, d_model]
        p = self.layout.unflatten(self.w0)
        h0 = F.relu(F.linear(batch.x_s, p["fc1.weight"], p["fc1.bias"]))  # base network's hidden units [B, n_s, hidden]
        lab = self.label_emb(batch.y_s) + torch.gather(pe, 1, batch.y_s[..., None].expand(-1, -1, pe.shape[-1]))
        sup = self.sample_proj(batch.x_s) + self.hidden_proj(h0) + lab + self.kind[0]  # [B, n_s, d_model]
        cls = self.label_emb.weight[:a] + pe + self.kind[1]  # [B, a, d_model]
        parts, pads = [sup, cls], [~batch.m_s, ~batch.answer_mask]
        if self.unit_tokens is not None:
            parts.append(self.unit_tokens.expand(B, -1, -1))
            pads.append(torch.zeros(B, len(self.unit_tokens), dtype=torch.bool))
        return torch.cat(parts, 1), torch.cat(pads, 1)

    def forward_weights(self, batch: EpisodeBatch) -> torch.Tensor:
        """Generated weights w [B, P]: w0 plus the decoded slice-token outputs."""
        s = self.layout.spec
        B, a = batch.prompts.shape[:2]
        n_s = batch.x_s.shape[1]
        x, pad = self.tokens(batch)
        out = self.norm(self.encoder(x, src_key_padding_mask=pad))  # [B, n_tokens, d_model]
        o = self.class_head(out[:, n_s: n_s + a]) * batch.answer_mask[..., None]  # [B, a, hidden + 1]
        pn = F.normalize(batch.prompts, dim=-1)  # [B, a, d_txt]
        d_w2 = torch.einsum("bcd,bch->bdh", pn, o[..., : s.hidden])  # Σ_c p̂_c Δr_cᵀ: [B, d_txt, hidden]
        d_b2 = torch.einsum("bcd,bc->bd", pn, o[..., -1])  # Σ_c p̂_c Δβ_c: [B, d_txt]
        p = {k: v.expand(B, *v.shape) for k, v in self.layout.unflatten(self.w0).items()}
        g = self.gain[1] / s.hidden ** 0.5  # nn.Linear's init scale for fc2 (fan-in = hidden)
        new = {"fc2.weight": p["fc2.weight"] + g * d_w2, "fc2.bias": p["fc2.bias"] + g * d_b2}
        if self.layers == "all":
            u = self.unit_head(out[:, n_s + a:])  # [B, hidden, d_img + 1]
            g1 = self.gain[0] / s.d_img ** 0.5
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
