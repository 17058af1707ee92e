"""Texts -> L2-normalised vectors: the last layer's state at the last token, without the LM head."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from kalmkg.llamacpp import runtime
from kalmkg.models import backbone


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


def last_hidden(decoder, rows: list[list[int]], pad_id: int, device, prefix=None, **kept):
    """The decoder's last (normed) hidden states of right-padded `rows` and their mask: ([n, T, D], [n, T]).
    `prefix`: a training FrozenPrefix, whose kept states of the frozen layers stand in for running them
    (`kept`: its options)."""
    ids, mask = pad_rows(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if prefix is not None:
        return prefix.hidden(ids, mask, rows, **kept), mask
    return decoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask


class Encoder(Protocol):
    """Texts -> [n, D] float32 L2-normalised vectors in input order: what `index.embed` encodes entities
    with and `qa.retrieve` ranks facts and relations with (TorchEncoder, GGUFEncoder, or a test double)."""

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


class TorchEncoder:
    """A transformers model (optionally LoRA-wrapped) as an encoder. `prefix`: training's FrozenPrefix,
    whose kept states of the frozen layers stand in for running them (validation during a run)."""

    def __init__(self, model, tokenizer, device: str = "cpu", prefix=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.prefix = prefix

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return self.encode_ids(ids, batch_size).numpy()

    def encode_ids(self, rows: list[list[int]], batch_size: int = 64):
        """Length-sorted batches (little padding), results in input order; float32 on the CPU."""
        import torch
        import torch.nn.functional as F

        from kalmkg.training.objective import last_token_pool

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
                    hidden, mask = last_hidden(net, [rows[i] for i in chunk], pad, self.device, self.prefix,
                                               evict=False)
                    vecs = F.normalize(last_token_pool(hidden, mask).float(), dim=-1).cpu()
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
    `encode_ids` takes token rows directly (export verification compares exact ids with torch).
    """

    def __init__(self, path, tokenizer=None, *, n_ctx: int = 512, n_threads: int | None = None,
                 truncate: bool = False):
        llama_cpp = runtime.load()
        self.path = str(path)
        self.tokenizer = tokenizer
        self.truncate = truncate  # cut long texts to the context (and embed "" as " ") instead of refusing
        # llama.cpp's threads busy-wait: more threads than free cores costs orders of magnitude (seen:
        # 8 s instead of 0.15 s per query on 2 cores with another job running). Default: the physical
        # cores this process may use, for prompt processing too.
        n_threads = n_threads or runtime.default_threads()
        # embedding=True makes llama-cpp-python allow many sequences in one batch over a unified KV cache
        self.llm = llama_cpp.Llama(
            self.path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=n_ctx, n_batch=n_ctx,
            n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=runtime.gpu_layers(llama_cpp),
            verbose=False,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self.truncate:
            texts = [t if t.strip() else " " for t in texts]
        if self.tokenizer is not None:
            rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        else:
            rows = [self.llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
        return [r[: self.llm.n_batch] for r in rows] if self.truncate else rows

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[n, D] float32 in input order (`batch_size` is unused: rows are packed by tokens)."""
        return self.encode_ids(self.tokenize(texts))

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        return embed_rows(self.llm, rows)

    def text_tokenizer(self) -> "LlamaTokenizer":
        """This GGUF's own tokenizer in the shape `text.truncate_texts` takes (cutting entity texts
        without transformers)."""
        return LlamaTokenizer(self.llm)

    def close(self) -> None:
        self.llm.close()


class LlamaTokenizer:
    """llama.cpp's tokenizer of a loaded GGUF behind the small part of the Hugging Face tokenizer call that
    kalmkg uses to cut texts (`text.Tokenizer`): ids without BOS and character offsets. A GGUF carries the
    vocabulary and pre-tokenizer of the model it was converted from, so the ids are the same."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, texts, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        rows = [self.llm.tokenize(t.encode("utf-8"), add_bos=add_special_tokens, special=False) for t in texts]
        out = {"input_ids": rows}
        if return_offsets_mapping:
            out["offset_mapping"] = [char_offsets(t, [self.llm.detokenize([i]) for i in row])
                                     for t, row in zip(texts, rows)]
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")


def char_offsets(text: str, pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """(start, end) character offsets of consecutive byte pieces of `text`'s UTF-8 encoding; a character
    split over pieces belongs whole to each of them (as Hugging Face's offsets have it)."""
    char_at = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    out, at = [], 0
    for piece in pieces:
        if not piece or at >= len(char_at):
            out.append((len(text), len(text)) if at >= len(char_at) else (char_at[at], char_at[at]))
            continue
        end = min(at + len(piece), len(char_at))
        out.append((char_at[at], char_at[end - 1] + 1))
        at = end
    return out


def embed_rows(llm, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """L2-normalised last-token vectors of token rows through a `llama_cpp.Llama` made with
    `embedding=True, pooling_type=LLAMA_POOLING_TYPE_LAST`, several rows per llama.cpp batch (one
    sequence id each). Token ids, not text: kalmkg's vectors are defined without BOS."""
    import llama_cpp

    n_embd, n_batch = llm.n_embd(), llm.n_batch
    n_seq = max(1, int(llm.context_params.n_seq_max))
    if any(not row for row in rows):
        raise ValueError("cannot embed an empty token row")
    groups = runtime.sequence_batches([len(r) for r in rows], n_batch, n_seq)
    out = np.zeros((len(rows), n_embd), dtype=np.float32)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for group in groups:
            k = 0
            for seq, i in enumerate(group):
                for pos, tok in enumerate(rows[i]):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
                    batch.seq_id[k][0] = seq
                    batch.logits[k] = True  # pooled embeddings need every position as an output
                    k += 1
            batch.n_tokens = k
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for seq, i in enumerate(group):
                vec = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(llm.ctx, seq), shape=(n_embd,))
                out[i] = vec / max(float(np.linalg.norm(vec)), 1e-12)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
    return out
