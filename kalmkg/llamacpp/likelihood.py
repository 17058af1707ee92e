"""How likely a model finds a text after each of several prefixes, through llama.cpp: the mean log-probability
of the text's tokens, every prefix a sequence of its own, packed into as few llama.cpp batches as fit.

`ask` uses it to read which relation a question asks (`kalmkg.qa.paraphrase`). It shares the context the
embeddings use (made with several sequences and one unified KV cache): the context is switched to logits
for the call and back, so no second copy of the KV cache is allocated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kalmkg.llamacpp.runtime import sequence_batches


class LikelihoodScorer:
    """Mean log-probabilities of a target text after prefixes, with the model of a multi-sequence
    `llama_cpp.Llama` (kalmkg's `GGUFEncoder.llm`)."""

    def __init__(self, llm):
        self.llm = llm

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def mean_logprobs(self, prefixes: Sequence[str], target: str) -> list[float]:
        """For each prefix, the mean log-probability of `target`'s tokens right after it (the target is
        tokenized once, on its own, so every prefix is scored on the same tokens)."""
        goal = self.tokenize(target)
        if not goal:
            raise ValueError("an empty target text")
        return mean_logprobs(self.llm, [self.tokenize(p) for p in prefixes], goal)


def mean_logprobs(llm, prefixes: Sequence[Sequence[int]], target: Sequence[int]) -> list[float]:
    """Token-level core of `LikelihoodScorer.mean_logprobs`: rows `prefix + target`, packed into batches of
    at most `n_batch` tokens and `n_seq_max` sequences, logits asked for only where a target token is
    predicted."""
    import llama_cpp

    n_batch = llm.n_batch
    n_seq = max(1, int(llm.context_params.n_seq_max))
    rows = [list(p) + list(target) for p in prefixes]
    if any(not p for p in prefixes):
        raise ValueError("an empty prefix")
    groups = sequence_batches([len(r) for r in rows], n_batch, n_seq)
    n_vocab = llm.n_vocab()
    goal = np.asarray(target, dtype=np.int64)
    out = [0.0] * len(rows)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    llama_cpp.llama_set_embeddings(llm.ctx, False)
    try:
        for group in groups:
            k, firsts = 0, []
            for seq, i in enumerate(group):
                start = len(prefixes[i]) - 1  # the position whose logits predict the first target token
                firsts.append(k + start)
                for pos, tok in enumerate(rows[i]):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
                    batch.seq_id[k][0] = seq
                    batch.logits[k] = start <= pos < len(rows[i]) - 1
                    k += 1
            batch.n_tokens = k
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, first in zip(group, firsts):
                logits = np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, first + j),
                                                         shape=(n_vocab,)) for j in range(len(goal))])
                out[i] = float(np.mean(log_softmax_at(logits, goal)))
    finally:
        llama_cpp.llama_set_embeddings(llm.ctx, True)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
    return out


def log_softmax_at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log softmax(logits[j])[tokens[j]] for each row j, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z[np.arange(len(tokens)), tokens] - np.log(np.exp(z).sum(axis=1))
