"""Texts -> L2-normalised vectors: the last layer's state at the last token, without the LM head."""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


def pad_rows(rows: list[list[int]], pad_id: int):
    """Right-padded [n, width] input ids and attention mask for token rows."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
    return ids, mask


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
                    ids, mask = pad_rows([rows[i] for i in chunk], pad)
                    hidden = net(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                    vecs = F.normalize(last_token_pool(hidden, mask.to(self.device)).float(), dim=-1).cpu()
                    if out.numel() == 0:
                        out = torch.empty(len(rows), vecs.shape[1])
                    out[torch.tensor(chunk)] = vecs
        finally:
            self.model.train(was_training)
        return out


class GGUFEncoder:
    """A GGUF file through llama.cpp as an encoder: the final (normed) hidden state at the last token
    (LLAMA_POOLING_TYPE_LAST), L2-normalised -- TorchEncoder's vectors up to quantization error.

    Texts are tokenized without BOS, as the torch side does (`add_special_tokens=False`): with the
    model's Hugging Face `tokenizer` when given (the exact ids training saw), else with llama.cpp's own.
    """

    def __init__(self, path, tokenizer=None, *, n_ctx: int = 512, n_threads: int | None = None):
        import llama_cpp
        from llama_cpp.llama_tokenizer import BaseLlamaTokenizer, LlamaTokenizer

        _quiet_llama_cpp(llama_cpp)

        class NoBos(BaseLlamaTokenizer):
            def __init__(self, hf=None, own=None):
                self.hf, self.own = hf, own

            def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
                if self.hf is not None:
                    return self.hf(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
                return self.own.tokenize(text, add_bos=False, special=False)

            def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
                if self.hf is not None:
                    return self.hf.decode(tokens).encode("utf-8")
                return self.own.detokenize(tokens, prev_tokens, special)

        # llama.cpp's own tokenizer needs a vocab-only model kept alive as long as the tokenizer
        self._vocab = None if tokenizer is not None else llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        own = LlamaTokenizer(self._vocab) if self._vocab is not None else None
        self.path = str(path)
        # llama.cpp's threads busy-wait: more threads than free cores costs orders of magnitude (seen:
        # 8 s instead of 0.15 s per query on 2 cores with another job running). Default: half the
        # logical cores (the physical ones on SMT machines), for prompt processing too.
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self.llm = llama_cpp.Llama(
            self.path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=n_ctx, n_batch=n_ctx,
            n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
            tokenizer=NoBos(tokenizer, own),
        )

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[n, D] float32 in input order. llama.cpp packs sequences into its own batches of n_ctx tokens;
        `batch_size` only bounds how many texts go to one call."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.llm.n_embd()), dtype=np.float32)
        out = []
        for start in range(0, len(texts), max(1, batch_size)):
            out.append(np.asarray(self.llm.embed(texts[start:start + batch_size], normalize=True, truncate=False),
                                  dtype=np.float32))
        return np.concatenate(out)


def _quiet_llama_cpp(llama_cpp) -> None:
    """llama.cpp logs model loading to stderr even with verbose=False; the CLI prints its own messages.
    (The log callback is process-wide in llama.cpp; kalmkg never wants those lines.)"""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it from C
