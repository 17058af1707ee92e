"""Does the GGUF reproduce the torch model? Last-token embeddings of a few graph texts and a greedy
continuation, computed once by the merged torch model (the reference, kept so the model can be freed) and
once by llama.cpp from the file, then compared (`judge`, plain numpy). Torch and llama_cpp are imported
inside the functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kalmkg import text
from kalmkg.encode import TorchEncoder, embed_rows
from kalmkg.errors import KalmkgError
from kalmkg.export.convert import llama_log
from kalmkg.llamacpp import runtime
from kalmkg.store import Store
from kalmkg.workspace import Workspace

# Minimum cosine between llama.cpp's and torch's embedding of every check text. F16 and Q8_0 are
# near-lossless (embedded SmolLM2-135M: F16 0.99999, Q8_0 0.9990); the K-quants lose more, most on small
# models whose rows are too short for whole K-quant blocks (measured Q6_K 0.994, Q5_K_M 0.964, Q4_K_M 0.978),
# so their thresholds only catch a broken file (wrong tokenizer, layout or rope: cosines far below 0.9).
MIN_COSINE = {"F16": 0.99, "Q8_0": 0.99, "Q6_K": 0.97, "Q5_K_M": 0.92, "Q4_K_M": 0.92}
NEAR_LOSSLESS = ("F16", "Q8_0")  # types whose first greedy token must match torch's (up to a tie)
GREEDY_TOKENS = 8
CHECK_TEXTS = 8
# Fixed check texts for when the workspace's store cannot be read (the views have the training layout).
_FALLBACK_TEXTS = ("Paris, the capital and largest city of France", "France, a country in Western Europe",
                   "Marie Curie, a physicist and chemist", "aspirin, a medication used to reduce fever")


@dataclass
class Verification:
    """How closely the GGUF reproduces the torch model."""

    threshold: float
    cosines: list[float]
    min_cosine: float
    texts: int
    tokenizer_match: bool  # llama.cpp tokenized every check text exactly as the HF tokenizer
    prompt: str
    torch_tokens: list[int]
    llama_tokens: list[int]
    greedy_match: bool
    first_token_match: bool
    logits_cosine: float  # first generation step, torch vs llama.cpp (centered logits)
    first_token_margin: float  # torch logit of its own pick minus that of llama.cpp's pick (0 when equal)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Reference:
    """What the torch model computed, kept so the model can be freed before llama.cpp loads the GGUF."""

    texts: list[str]
    ids: list[list[int]]
    vectors: Any  # np.ndarray [n, d], L2-normalised
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    first_logits: Any  # np.ndarray [vocab]


@dataclass
class LlamaOutputs:
    """What llama.cpp computed from the GGUF for the same texts and prompt."""

    ids: list[list[int]]  # its own tokenization of the texts
    vectors: Any  # np.ndarray [n, d], L2-normalised
    tokens: list[int]  # greedy continuation of the prompt
    first_logits: Any  # np.ndarray [vocab]


# ------------------------------------------------------------------------------------------ torch side


def check_texts(workspace: Workspace, tokenizer, max_tokens: int) -> tuple[list[str], str]:
    """Tail views of a few entities spread over the graph, two hr views, and one hr view as prompt."""
    try:
        with Store.open(workspace) as store:
            entities = store.entity_table()
            relations = store.relation_table()
            triples = store.triples_array(("train",))
    except KalmkgError:  # no store (a copied run) or another process writing it: fixed texts still check
        entities = None
    if entities is None or entities.num_rows == 0 or len(triples) == 0:
        texts = [text.tail_view(t) for t in _FALLBACK_TEXTS]
        prompt = text.hr_view(_FALLBACK_TEXTS[0], "capital of")
        return texts + [prompt], prompt
    labels, descriptions = entities["label"].to_pylist(), entities["description"].to_pylist()
    n = len(labels)
    picks = sorted({round(i * (n - 1) / max(1, CHECK_TEXTS - 1)) for i in range(min(n, CHECK_TEXTS))})
    entity_texts = text.truncate_texts([text.entity_text(labels[i], descriptions[i]) for i in picks],
                                            tokenizer, max_tokens)
    texts = [text.tail_view(t) for t in entity_texts]
    rel_labels = relations["label"].to_pylist()
    hr = []
    for h, r, _ in triples[: 2].tolist():
        head = text.truncate_texts([text.entity_text(labels[h], descriptions[h])], tokenizer, max_tokens)[0]
        hr.append(text.hr_view(head, text.relation_text(rel_labels[r])))
    return texts + hr, hr[0]


def torch_reference(model, tokenizer, texts: list[str], prompt: str) -> Reference:
    """The torch model's embeddings of ``texts`` and its greedy continuation of ``prompt``."""
    import torch

    # Training tokenizes without special tokens (no BOS); the llama.cpp side must do the same.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    vectors = TorchEncoder(model, tokenizer).encode_ids(ids).numpy()
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        first_logits = out.logits[0, -1].float().numpy().copy()
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == GREEDY_TOKENS:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(texts, ids, np.asarray(vectors, dtype=np.float32), prompt, prompt_ids, tokens, first_logits)


# ------------------------------------------------------------------------------------------ llama side


def verify(path: Path, ref: Reference, quant: str) -> Verification:
    """Compare the GGUF with the torch reference; raise (the caller removes the file) when it is broken."""
    return judge(ref, llama_outputs(path, ref), quant)


def llama_outputs(path: Path, ref: Reference) -> LlamaOutputs:
    """llama.cpp's embeddings of the reference texts and its greedy continuation of the reference prompt."""
    llama_cpp = runtime.load()
    gpu = runtime.gpu_layers(llama_cpp)
    with llama_log() as log:
        try:
            llm = llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                                  n_ctx=512, n_gpu_layers=gpu, verbose=False)
        except Exception as e:  # ValueError: "Failed to load model from file"
            why = next((ln.strip() for ln in reversed(log) if "error" in ln.lower() or "fail" in ln.lower()), str(e))
            raise KalmkgError(f"llama.cpp cannot load the exported GGUF: {why[:300]}") from None
        try:
            ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in ref.texts]
            vectors = embed_rows(llm, ids)
        finally:
            llm.close()
        gen = llama_cpp.Llama(str(path), n_ctx=512, n_gpu_layers=gpu, verbose=False)
        try:
            tokens, first = greedy(gen, ref.prompt_ids, len(ref.tokens))
        finally:
            gen.close()
    return LlamaOutputs(ids, vectors, tokens, first)


def greedy(llm, prompt_ids: list[int], n: int):
    """(tokens, first-step logits) of greedy decoding through llama.cpp (argmax, as on the torch side)."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt_ids)
    n_vocab = llm.n_vocab()
    tokens: list[int] = []
    first = None
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        if first is None:
            first = logits.astype(np.float32).copy()
        tokens.append(int(logits.argmax()))
        if len(tokens) < n:
            llm.eval([tokens[-1]])
    return tokens, first


# ---------------------------------------------------------------------------------------- the verdict


def judge(ref: Reference, got: LlamaOutputs, quant: str) -> Verification:
    """The comparison of both sides; a KalmkgError when an embedding is too far off, or when a near-lossless
    type picks another first greedy token than torch by more than a tie."""
    threshold = MIN_COSINE[quant]
    cosines = [float(c) for c in np.sum(got.vectors * ref.vectors, axis=1)]
    tokenizer_match = got.ids == ref.ids
    t_logits = ref.first_logits
    a, b = t_logits - t_logits.mean(), got.first_logits - got.first_logits.mean()
    logits_cosine = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
    first_match = bool(got.tokens[:1] == ref.tokens[:1])
    margin = 0.0 if first_match else float(t_logits[ref.tokens[0]] - t_logits[got.tokens[0]])
    result = Verification(threshold=threshold, cosines=[round(c, 6) for c in cosines],
                          min_cosine=round(min(cosines), 6), texts=len(cosines), tokenizer_match=tokenizer_match,
                          prompt=ref.prompt, torch_tokens=ref.tokens, llama_tokens=got.tokens,
                          greedy_match=got.tokens == ref.tokens, first_token_match=first_match,
                          logits_cosine=round(logits_cosine, 6), first_token_margin=round(margin, 6))
    if min(cosines) < threshold:
        worst = ref.texts[int(np.argmin(cosines))]
        hint = "" if tokenizer_match else "; llama.cpp tokenizes the texts differently from the HF tokenizer"
        raise KalmkgError(f"the {quant} GGUF does not reproduce the model's embeddings: min cosine "
                          f"{min(cosines):.4f} < {threshold} (on {worst[:60]!r}){hint}; nothing was written")
    # The first greedy token must agree for the near-lossless types, unless the two picks are a tie within
    # the measured logit noise (a random or barely trained model can have its top logits that close).
    if quant in NEAR_LOSSLESS and not first_match and margin > tie_tolerance(a, b):
        raise KalmkgError(f"the {quant} GGUF generates differently from the model: first greedy token "
                          f"{got.tokens[0]} instead of {ref.tokens[0]} (torch margin {margin:.3f}); nothing was written")
    return result


def greedy_difference(v: Verification) -> str | None:
    """A note on a greedy continuation that passed the checks yet differs from torch's; None when the same."""
    if not v.first_token_match and v.first_token_margin > 0:
        return (f"greedy continuation differs from torch at the first token (torch margin "
                f"{v.first_token_margin:.3f}): a near tie")
    if not v.greedy_match:
        return "greedy continuation differs from torch after the first token (quantization noise)"
    return None


def tie_tolerance(torch_centered, llama_centered) -> float:
    """Logit gaps below 3x the RMS difference between the two sides' (centered) logits count as ties."""
    return 3.0 * float(np.sqrt(np.mean((torch_centered - llama_centered) ** 2))) + 1e-4
