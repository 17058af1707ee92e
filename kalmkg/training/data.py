"""Training examples from the store: texts tokenized once, batches as lists of token ids.

An example is a query (entity, relation) and its answer entity. Every train triple (h, r, t) gives
two: (h, r) -> t and the inverse (t, r + R) -> h, so one model answers tail and head queries.
Relation ids >= R are inverses.
"""

from __future__ import annotations

import itertools
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from kalmkg import text
from kalmkg.errors import KalmkgError
from kalmkg.files import atomic_path
from kalmkg.prompts import no_context_messages
from kalmkg.store import Store
from kalmkg.text import GraphTexts
from kalmkg.training.config import TrainConfig
from kalmkg.training.questions import QuestionQuery, QuestionWriter, question_queries, sample_questions
from kalmkg.training.reading import ReadingWriter
from kalmkg.workspace import Workspace


@dataclass
class TrainingGraph:
    """What training reads from the store, read once and then let go (other commands may use the
    workspace meanwhile)."""

    train: np.ndarray  # [n, 3] triples of the train split
    valid: np.ndarray  # the valid split (validation samples from it)
    all: np.ndarray  # every split (validation filters known answers against it)
    fingerprint: str
    entity_table: Any
    relation_table: Any


def read_graph(workspace: Workspace) -> TrainingGraph:
    with Store.open(workspace) as store:
        graph = TrainingGraph(store.triples_array(("train",)), store.triples_array(("valid",)),
                              store.triples_array(), store.fingerprint(), store.entity_table(),
                              store.relation_table())
    if len(graph.train) == 0:
        raise KalmkgError("the train split is empty: ingest a graph (and `kalmkg split` if needed) first")
    return graph


def with_inverses(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """[n, 3] (h, r, t) -> [2n, 3] (query, relation, answer): the triples, then their inverses."""
    inverse = np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)
    return np.concatenate([triples, inverse]).astype(np.int64)


class TokenRows(Sequence):
    """Token rows end to end in one array, and the offset where each starts: a row is a slice, so a graph
    of millions of views holds 4 bytes per token instead of a Python list per row (and an int object per
    token). `rows[i]` is row i as a list, as the step concatenates and hashes them."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, chunks: Iterable[list[list[int]]]) -> "TokenRows":
        """Rows from chunks of token lists (each chunk let go once copied)."""
        flats, lengths = [np.zeros(0, dtype=np.int32)], [np.zeros(0, dtype=np.int64)]
        for rows in chunks:
            lengths.append(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
            flats.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths[-1].sum())))
        return cls(np.concatenate(flats), np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> list[int]:
        return self.flat[self.offsets[i]:self.offsets[i + 1]].tolist()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass
class TokenizedExamples:
    """Token ids of every view an epoch needs, computed once per run."""

    examples: np.ndarray  # [n, 3] query entity, relation (>= R: inverse), answer entity
    hr_index: np.ndarray  # [n] row of `hr_ids` for each example
    hr_ids: TokenRows  # unique (query, relation) views, in (query, relation) order
    tail_ids: TokenRows  # per entity: its tail view
    target_ids: TokenRows  # per entity: completion target + EOS
    pad_id: int = 0
    lengths: np.ndarray = field(default=None)  # [n] tokens of hr view + tail view (for bucketing)

    def hr_index_of(self, examples: np.ndarray) -> list[int]:
        """Row of `hr_ids` for each example of `examples` (any [m, 3] array of this run's examples)."""
        keys, width = self._hr_keys
        return np.searchsorted(keys, examples[:, 0] * width + examples[:, 1]).tolist()

    @cached_property
    def _hr_keys(self) -> tuple[np.ndarray, int]:
        """The hr views' (query, relation) as sorted keys query * width + relation: the order of `hr_ids`."""
        width = int(self.examples[:, 1].max()) + 1 if len(self.examples) else 1
        return np.unique(self.examples[:, 0] * width + self.examples[:, 1]), width


# texts tokenized at a time: the tokenizer's output for all of a large graph's views at once is many GB
TOKENIZE_CHUNK = 16384


def _chunks(n: int) -> Iterator[slice]:
    return (slice(a, min(a + TOKENIZE_CHUNK, n)) for a in range(0, n, TOKENIZE_CHUNK))


def tokenize_examples(texts: GraphTexts, examples: np.ndarray, tokenizer, max_seq_len: int = 256) -> TokenizedExamples:
    keys, hr_index = np.unique(examples[:, :2], axis=0, return_inverse=True) if len(examples) else \
        (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))
    tok = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"] if xs else []  # noqa: E731
    hr_ids = TokenRows.of(tok([text.hr_view(texts.entities[q], texts.relations[r]) for q, r in keys[part].tolist()])
                          for part in _chunks(len(keys)))
    tail_ids = TokenRows.of(tok([text.tail_view(t) for t in texts.entities[part]])
                            for part in _chunks(len(texts.entities)))
    eos = tokenizer.eos_token_id
    # The completion sequence is hr + target; keep it within max_seq_len by cutting the target.
    hr_len, tail_len = hr_ids.lengths(), tail_ids.lengths()
    hr_index = hr_index.reshape(-1)
    longest_hr = int(hr_len.max()) if len(hr_len) else 0
    if longest_hr + 2 > max_seq_len:
        raise ValueError(f"a head-relation view has {longest_hr} tokens, over max_seq_len={max_seq_len}")
    room = max_seq_len - longest_hr
    target_ids = TokenRows.of([t + [eos] if len(t) < room else t[: room - 1] + [eos]
                               for t in tok([text.completion_target(e) for e in texts.entities[part]])]
                              for part in _chunks(len(texts.entities)))
    lengths = hr_len[hr_index] + tail_len[examples[:, 2]] if len(examples) else np.zeros(0, dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenizedExamples(examples, hr_index, hr_ids, tail_ids, target_ids, pad, lengths)


def load_tokens(texts: GraphTexts, train_triples: np.ndarray, tokenizer, max_seq_len: int,
                cache: Path | None) -> TokenizedExamples:
    """The run's examples (train triples and their inverses) tokenized, kept in `cache` (the run
    folder's tokens.npz) so that a resumed run reuses them; `cache` None: not kept."""
    if cache is not None and cache.exists():
        return read_tokens(cache)
    try:
        tokens = tokenize_examples(texts, with_inverses(train_triples, texts.num_relations), tokenizer, max_seq_len)
    except ValueError as exc:  # a head-relation view longer than the sequence
        raise KalmkgError(f"--max-seq-len {max_seq_len} is too small: {exc} (raise --max-seq-len or "
                          "lower --max-entity-tokens)") from None
    if cache is not None:
        with atomic_path(cache) as tmp:
            write_tokens(tokens, tmp)
    return tokens


_RAGGED = ("hr_ids", "tail_ids", "target_ids")


def write_tokens(tokens: TokenizedExamples, path: Path) -> None:
    """`tokens` as plain arrays (numpy's format, no pickle: a run folder from elsewhere runs no code); each
    set of token rows is its ids end to end and the offsets where each row starts."""
    arrays = {"examples": tokens.examples, "hr_index": tokens.hr_index, "lengths": tokens.lengths,
              "pad_id": np.asarray(tokens.pad_id)}
    for name in _RAGGED:
        rows = getattr(tokens, name)
        arrays[f"{name}.flat"], arrays[f"{name}.offsets"] = rows.flat, rows.offsets
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def read_tokens(path: Path) -> TokenizedExamples:
    try:
        with np.load(path, allow_pickle=False) as data:
            ragged = {name: TokenRows(data[f"{name}.flat"].astype(np.int32), data[f"{name}.offsets"].astype(np.int64))
                      for name in _RAGGED}
            return TokenizedExamples(data["examples"], data["hr_index"], pad_id=int(data["pad_id"]),
                                     lengths=data["lengths"], **ragged)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # damaged, or another version
        raise KalmkgError(f"cannot read the run's token cache {path} ({exc}); delete it and it is made again") from None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: np.ndarray | None = None,
                  bucket: bool = True, bucket_span: int = 32) -> list[np.ndarray]:
    """Deterministic batches of example indices for one epoch (full batches only).

    With `bucket`, a random window of `bucket_span` batches is sorted by length before it is cut, so
    batches pad little; the batch order is then shuffled again. Same (seed, epoch) -> same batches,
    which is what makes resuming exact.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket and lengths is not None:
        window = batch_size * bucket_span
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.array_split(order, max(1, -(-n // window)))
        ]) if n else order
    batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def lm_positions(batch_size: int, lm_examples: int) -> np.ndarray:
    """Which examples of a global batch also get the LM loss: spread evenly (floor(i * B / m)), so
    every process of a split batch gets its share, and the same examples are chosen however the
    batch is split."""
    m = min(max(lm_examples, 0), batch_size)
    return (np.arange(m) * batch_size) // m if m else np.zeros(0, dtype=np.int64)


def lm_flags(batch_size: int, cfg: TrainConfig) -> np.ndarray:
    """[batch_size] bool: which examples of a global batch also get the LM loss (none when it has no
    weight)."""
    flags = np.zeros(batch_size, dtype=bool)
    flags[lm_positions(batch_size, cfg.lm_examples if cfg.lm_weight > 0 else 0)] = True
    return flags


def batch_groups(tokens: TokenizedExamples, cfg: TrainConfig, epoch: int,
                 first_batch: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """The run's batches from batch `first_batch` of `epoch` on, `cfg.grad_accum` at a time (one
    optimizer step each), endlessly; yields (epoch, the batch after the group, the group's example
    arrays). Where a run stopped is where its resume starts: the same batches a straight run sees.
    """
    while True:
        batches = epoch_batches(len(tokens.examples), cfg.batch_size, cfg.seed, epoch, tokens.lengths, cfg.bucket)
        for start in range(first_batch, len(batches) - cfg.grad_accum + 1, cfg.grad_accum):
            end = start + cfg.grad_accum
            yield epoch, end, [tokens.examples[b] for b in batches[start:end]]
        epoch, first_batch = epoch + 1, 0


def describe_batch(tokens: TokenizedExamples, batch: np.ndarray, tokenizer, cfg: TrainConfig) -> list[dict]:
    """The first 8 examples of a batch (indices into tokens.examples) as the texts the model sees:
    what a dry run shows."""
    lm = lm_flags(len(batch), cfg)
    out = []
    for pos, i in enumerate(batch.tolist()[:8]):
        _q, _r, a = tokens.examples[i].tolist()
        hr = tokens.hr_ids[tokens.hr_index[i]]
        out.append({"hr_view": tokenizer.decode(hr), "tail_view": tokenizer.decode(tokens.tail_ids[a]),
                    "lm_target": tokenizer.decode(tokens.target_ids[a]) if lm[pos] else None})
    return out


# ------------------------------------------------------------------ question-answer examples
def chat_example(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat `messages` (through the start of the model's turn) and of `reply` (through the
    end of its turn), by the tokenizer's own chat template. The two are tokenized apart, as at answer
    time: the prompt is tokenized alone and the reply is generated after it."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise KalmkgError("the base model's chat template does not extend its prompt with the reply; "
                          "train without --question-weight and --reading-weight")
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(prompt), ids(full[len(prompt):])


@dataclass
class QuestionData:
    """The train graph's queries as questions, tokenized when a batch draws them."""

    queries: list[QuestionQuery]
    writer: QuestionWriter
    tokenizer: Any

    @classmethod
    def build(cls, graph: TrainingGraph, tokenizer) -> "QuestionData":
        entities, relations = graph.entity_table, graph.relation_table
        R = relations.num_rows
        writer = QuestionWriter(entities["label"].to_pylist(), relations["label"].to_pylist(),
                                relations["description"].to_pylist())
        return cls(question_queries(graph.train, R), writer, tokenizer)

    def describe(self, k: int, seed: int) -> dict:
        """What a dry run shows: how many queries are asked, and the first batch's questions and replies."""
        drawn = sample_questions(len(self.queries), k, seed, 0)
        return {"queries": len(self.queries),
                "first_batch": [self.writer.pair(self.queries[i], pick) for i, pick in drawn[:8]]}

    def batch(self, k: int, seed: int, index: int) -> list[tuple[list[int], list[int]]]:
        """The `k` (prompt, reply) token pairs of batch `index` of the run (see `sample_questions`)."""
        drawn = sample_questions(len(self.queries), k, seed, index)
        pairs = [self.writer.pair(self.queries[i], pick) for i, pick in drawn]
        return [chat_example(self.tokenizer, no_context_messages(q), reply) for q, reply in pairs]

    def views(self, k: int, seed: int, index: int) -> np.ndarray:
        """[k, 3] (entity, relation, answer) of the questions `batch` gives for batch `index`: the query and
        one of its answers (the form pick chooses which), the positive of the question's view in L_exp."""
        drawn = sample_questions(len(self.queries), k, seed, index)
        rows = [(q.entity, q.relation, q.answers[pick % len(q.answers)])
                for q, pick in ((self.queries[i], pick) for i, pick in drawn)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


@dataclass
class ReadingData:
    """`ask`'s fact-reading turns written from the train graph (`reading.py`), tokenized when a batch
    draws them."""

    writer: ReadingWriter
    tokenizer: Any

    @classmethod
    def build(cls, graph: TrainingGraph, tokenizer) -> "ReadingData":
        questions = QuestionData.build(graph, tokenizer)
        return cls(ReadingWriter(questions.writer, graph.train, questions.queries), tokenizer)

    def describe(self, k: int, seed: int) -> list[dict]:
        """What a dry run shows: the first batch's turns (the user turn and the reply)."""
        turns = [self.writer.turn(seed, 0, j) for j in range(min(k, 4))]
        return [{"kind": t.kind, "prompt": t.messages[-1]["content"], "reply": t.reply} for t in turns]

    def batch(self, k: int, seed: int, index: int) -> list[tuple[list[int], list[int]]]:
        """The `k` (prompt, reply) token pairs of batch `index` of the run."""
        turns = [self.writer.turn(seed, index, j) for j in range(k)]
        return [chat_example(self.tokenizer, t.messages, t.reply) for t in turns]
