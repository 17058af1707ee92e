"""Texts -> L2-normalised vectors: the last layer's state at the last token, without the LM head."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


class TorchEncoder:
    """A transformers model (optionally LoRA-wrapped) as an encoder."""

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return self.encode_ids(ids, batch_size).numpy()

    def encode_ids(self, rows: list[list[int]], batch_size: int = 64):
        """Length-sorted batches (little padding), results in input order; float32 on the CPU."""
        import torch
        import torch.nn.functional as F

        from kalmkg.models import backbone
        from kalmkg.objective import last_token_pool

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = torch.empty(0)
        was_training = self.model.training
        self.model.eval()
        net = backbone(self.model)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    chunk = order[start:start + batch_size]
                    width = max(len(rows[i]) for i in chunk)
                    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for j, i in enumerate(chunk):
                        ids[j, : len(rows[i])] = torch.tensor(rows[i])
                        mask[j, : len(rows[i])] = 1
                    hidden = net(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                    vecs = F.normalize(last_token_pool(hidden, mask.to(self.device)).float(), dim=-1).cpu()
                    if out.numel() == 0:
                        out = torch.empty(len(rows), vecs.shape[1])
                    out[torch.tensor(chunk)] = vecs
        finally:
            self.model.train(was_training)
        return out
