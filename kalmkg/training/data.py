"""Training examples from the store: texts tokenized once, batches as lists of token ids.

An example is a query (entity, relation) and its answer entity. Every train triple (h, r, t) gives
two: (h, r) -> t and the inverse (t, r + R) -> h, so one model answers tail and head queries.
Relation ids >= R are inverses.
"""

from __future__ import annotations

import itertools
import shutil
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from kalmkg import text
from kalmkg.errors import KalmkgError
from kalmkg.evaluation.metrics import KnownAnswers
from kalmkg.files import atomic_path
from kalmkg.npy import write_npy
from kalmkg.prompts import no_context_messages
from kalmkg.store import SPLITS, Store
from kalmkg.text import GraphTexts
from kalmkg.training.config import TrainConfig
from kalmkg.training.permutation import Permutation
from kalmkg.training.questions import QuestionQuery, QuestionWriter, question_queries, sample_questions
from kalmkg.training.reading import ReadingWriter
from kalmkg.workspace import Workspace


@dataclass
class TrainingGraph:
    """What training reads from the store, read once and then let go (other commands may use the
    workspace meanwhile). The triples and the known answers are files of a folder this process alone
    uses (removed when it ends), memory-mapped: a graph of 10M triples is not held in memory."""

    train: np.ndarray  # [n, 3] triples of the train split (memory-mapped)
    valid: np.ndarray  # the valid split (validation samples from it)
    all: np.ndarray  # every split (memory-mapped; the structure model reads it)
    known_train: KnownAnswers  # (query, relation) -> answers in train, both directions: the false negatives
    known_all: KnownAnswers  # ... in every split: validation's filter
    examples: Path  # the train triples and their inverses (`with_inverses`) as a `.npy` file
    fingerprint: str
    entity_table: Any
    relation_table: Any
    folder: Path


def read_graph(workspace: Workspace) -> TrainingGraph:
    from kalmkg.files import staging_dir
    from kalmkg.npy import open_npy

    folder = staging_dir(workspace.root, ".train-graph.")
    try:
        with Store.open(workspace) as store:
            entity_table, relation_table = store.entity_table(), store.relation_table()
            R = relation_table.num_rows
            for name, splits in (("train", ("train",)), ("valid", ("valid",)), ("all", SPLITS)):
                store.write_triples(folder / f"{name}.npy", splits)
            store.write_triples(folder / "examples.npy", ("train",), inverses_of=R)
            store.write_known_answers(folder / "known-train", ("train",), R)
            store.write_known_answers(folder / "known-all", SPLITS, R)
            fingerprint = store.fingerprint()
        graph = TrainingGraph(open_npy(folder / "train.npy"), np.array(open_npy(folder / "valid.npy")),
                              open_npy(folder / "all.npy"), KnownAnswers.open(folder / "known-train"),
                              KnownAnswers.open(folder / "known-all"), folder / "examples.npy", fingerprint,
                              entity_table, relation_table, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(graph, shutil.rmtree, folder, True)  # gone with the graph (a killed process's: swept later)
    if len(graph.train) == 0:
        raise KalmkgError("the train split is empty: ingest a graph (and `kalmkg split` if needed) first")
    return graph


def with_inverses(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """[n, 3] (h, r, t) -> [2n, 3] (query, relation, answer): the triples, then their inverses."""
    return np.concatenate([triples, inverses(triples, num_relations)]).astype(np.int64)


def inverses(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """[n, 3] (h, r, t) -> [n, 3] (t, r + R, h)."""
    triples = np.asarray(triples, dtype=np.int64)
    return np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)


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


class HrViews:
    """Token ids of the head-relation views, by key `entity * 2R + relation`, tokenized when a batch
    asks for them: a graph of 10M triples has some 20M, which would take minutes to tokenize and
    gigabytes to hold; a batch needs a few dozen (a tokenizer call of well under a millisecond).
    The last `keep` views asked for are kept."""

    def __init__(self, texts: GraphTexts, tokenizer, keep: int = 1 << 16):
        self.texts, self.tokenizer, self.keep = texts, tokenizer, keep
        self.width = max(len(texts.relations), 1)
        self._kept: OrderedDict[int, list[int]] = OrderedDict()

    def key(self, entity: int, relation: int) -> int:
        return int(entity) * self.width + int(relation)

    def text(self, key: int) -> str:
        entity, relation = divmod(int(key), self.width)
        return text.hr_view(self.texts.entities[entity], self.texts.relations[relation])

    def __getitem__(self, key: int) -> list[int]:
        ids = self._kept.get(key)
        if ids is None:
            ids = self.tokenizer(self.text(key), add_special_tokens=False)["input_ids"]
            self._kept[key] = ids
            if len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return ids


@dataclass
class TokenizedExamples:
    """The run's examples and the token ids of every view an epoch needs: the entities' tail views and
    completion targets tokenized once per run, the head-relation views when a batch draws them."""

    examples: np.ndarray  # [n, 3] query entity, relation (>= R: inverse), answer entity (memory-mapped in a run)
    hr_ids: HrViews  # the head-relation views, by `hr_index_of`'s keys
    tail_ids: TokenRows  # per entity: its tail view
    target_ids: TokenRows  # per entity: completion target + EOS
    relation_lengths: np.ndarray  # per relation (2R): tokens of its hr view with an empty head
    pad_id: int = 0

    def hr_index_of(self, examples: np.ndarray) -> list[int]:
        """The `hr_ids` key of each example of `examples` (any [m, 3] array of this run's examples)."""
        examples = np.asarray(examples, dtype=np.int64).reshape(-1, 3)
        return (examples[:, 0] * self.hr_ids.width + examples[:, 1]).tolist()

    @property
    def lengths(self) -> "ExampleLengths":
        return ExampleLengths(self)


class ExampleLengths:
    """`lengths[indices]`: about how many tokens the hr view and the tail view of those examples have,
    from counts per entity and per relation (within a token or two of the views' own: enough to bucket
    batches by, and nothing per example is held)."""

    def __init__(self, tokens: TokenizedExamples):
        self.tokens = tokens
        self._tail = tokens.tail_ids.lengths()

    def __getitem__(self, indices) -> np.ndarray:
        ex = np.asarray(self.tokens.examples[np.asarray(indices)], dtype=np.int64).reshape(-1, 3)
        return self._tail[ex[:, 0]] + self.tokens.relation_lengths[ex[:, 1]] + self._tail[ex[:, 2]]

    def __len__(self) -> int:
        return len(self.tokens.examples)


# texts tokenized at a time: the tokenizer's output for all of a large graph's views at once is many GB
TOKENIZE_CHUNK = 16384


def _chunks(n: int) -> Iterator[slice]:
    return (slice(a, min(a + TOKENIZE_CHUNK, n)) for a in range(0, n, TOKENIZE_CHUNK))


def longest_hr_view(tail_lengths: np.ndarray, relation_lengths: np.ndarray) -> int:
    """A bound on the tokens of any head-relation view: the longest entity's tail view (its text and the
    two braces, which stand for the comma and space the head takes in the hr view) in the longest
    relation's view with an empty head."""
    return int(tail_lengths.max(initial=0)) + int(relation_lengths.max(initial=0))


def tokenize_examples(texts: GraphTexts, examples: np.ndarray, tokenizer, max_seq_len: int = 256) -> TokenizedExamples:
    tok = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"] if xs else []  # noqa: E731
    tail_ids = TokenRows.of(tok([text.tail_view(t) for t in texts.entities[part]])
                            for part in _chunks(len(texts.entities)))
    relation_lengths = np.asarray([len(ids) for ids in tok([text.hr_view("", r) for r in texts.relations])],
                                  dtype=np.int64)
    eos = tokenizer.eos_token_id
    # The completion sequence is hr + target; keep it within max_seq_len by cutting the target.
    longest_hr = longest_hr_view(tail_ids.lengths(), relation_lengths)
    if longest_hr + 2 > max_seq_len:
        raise ValueError(f"a head-relation view can have {longest_hr} tokens, over max_seq_len={max_seq_len}")
    room = max_seq_len - longest_hr
    target_ids = TokenRows.of([t + [eos] if len(t) < room else t[: room - 1] + [eos]
                               for t in tok([text.completion_target(e) for e in texts.entities[part]])]
                              for part in _chunks(len(texts.entities)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenizedExamples(examples, HrViews(texts, tokenizer), tail_ids, target_ids, relation_lengths, pad)


def load_tokens(texts: GraphTexts, examples: Path | np.ndarray, tokenizer, max_seq_len: int,
                cache: Path | None) -> TokenizedExamples:
    """The run's examples and their token ids, kept in the folder `cache` (the run folder's tokens/) so
    that a resumed run reuses them. `examples`: the train triples and their inverses (`with_inverses`),
    as an array or a `.npy` file (`TrainingGraph.examples`), which is copied into `cache` (by the
    system: a 10M-triple graph's file passes through no memory of this process). `cache` None: in memory."""
    from kalmkg.npy import open_npy

    if cache is not None and cache.exists():
        return read_tokens(cache, texts, tokenizer)
    try:
        tokens = tokenize_examples(texts, np.zeros((0, 3), dtype=np.int64), tokenizer, max_seq_len)
    except ValueError as exc:  # a head-relation view longer than the sequence
        raise KalmkgError(f"--max-seq-len {max_seq_len} is too small: {exc} (raise --max-seq-len or "
                          "lower --max-entity-tokens)") from None
    if cache is None:
        tokens.examples = open_npy(examples) if isinstance(examples, Path) else np.asarray(examples)
        return tokens
    with atomic_path(cache) as tmp:
        tmp.mkdir()
        if isinstance(examples, Path):
            shutil.copyfile(examples, tmp / "examples.npy")
        else:
            write_npy(tmp / "examples.npy", np.asarray(examples, dtype=np.int64).reshape(-1, 3))
        write_tokens(tokens, tmp)
    return read_tokens(cache, texts, tokenizer)


_RAGGED = ("tail_ids", "target_ids")


def write_tokens(tokens: TokenizedExamples, folder: Path) -> None:
    """`tokens`' per-entity and per-relation arrays as `.npy` files in `folder` (numpy's format, no
    pickle: a run folder from elsewhere runs no code); each set of token rows is its ids end to end and
    the offsets where each row starts. The examples are `examples.npy` beside them (`load_tokens`)."""
    arrays = {"relation_lengths": tokens.relation_lengths, "pad_id": np.asarray([tokens.pad_id])}
    for name in _RAGGED:
        rows = getattr(tokens, name)
        arrays[f"{name}.flat"], arrays[f"{name}.offsets"] = rows.flat, rows.offsets
    for name, array in arrays.items():
        write_npy(folder / f"{name}.npy", array)


def read_tokens(folder: Path, texts: GraphTexts, tokenizer) -> TokenizedExamples:
    from kalmkg.npy import open_npy

    try:
        data = {name: open_npy(folder / f"{name}.npy") for name in
                ("examples", "relation_lengths", "pad_id", *(f"{r}.{p}" for r in _RAGGED for p in ("flat", "offsets")))}
        ragged = {name: TokenRows(data[f"{name}.flat"], data[f"{name}.offsets"]) for name in _RAGGED}
        examples = data["examples"]
        if examples.ndim != 2 or examples.shape[1] != 3 or len(data["relation_lengths"]) != len(texts.relations):
            raise ValueError("its arrays do not fit the graph")
        return TokenizedExamples(examples, HrViews(texts, tokenizer), relation_lengths=np.array(data["relation_lengths"]),
                                 pad_id=int(data["pad_id"][0]), **ragged)
    except (OSError, ValueError, KeyError, EOFError, IndexError) as exc:  # damaged, or another version
        raise KalmkgError(f"cannot read the run's token cache {folder} ({exc}); delete it and it is made again") from None


class EpochBatches(Sequence):
    """One epoch's batches of example indices (full batches only), each computed when it is asked for:
    nothing per example is held, so an epoch of 20M examples costs no index array.

    The examples are in a random order (`Permutation`, keyed by seed and epoch). With `bucket`, each
    window of `bucket_span` batches of that order is sorted by length before it is cut, so batches pad
    little, and the batches are then taken in a second random order. Same (seed, epoch) -> same
    batches, which is what makes resuming exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, lengths=None, bucket: bool = True,
                 bucket_span: int = 32):
        self.n, self.batch_size, self.lengths, self.bucket = n, batch_size, lengths, bucket
        self.window = batch_size * bucket_span
        self.order = Permutation(n, [seed, epoch])
        self.count = n // batch_size if batch_size > 0 else 0
        self.batch_order = Permutation(self.count, [seed, epoch, 1]) if bucket else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(f"batch {i} of an epoch of {self.count}")
        i %= self.count
        j = int(self.batch_order[[i]][0]) if self.bucket else i
        start = j * self.batch_size
        if not (self.bucket and self.lengths is not None):
            return self.order[start:start + self.batch_size]
        lo = start - start % self.window  # the window this batch is cut from
        window = self.order[lo:min(lo + self.window, self.n)]
        window = window[np.argsort(np.asarray(self.lengths[window]), kind="stable")]
        return window[start - lo:start - lo + self.batch_size]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths=None,
                  bucket: bool = True, bucket_span: int = 32) -> EpochBatches:
    """The batches of one epoch (`EpochBatches`); `lengths[indices]` gives the examples' lengths."""
    return EpochBatches(n, batch_size, seed, epoch, lengths, bucket, bucket_span)


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
        hr = tokens.hr_ids[tokens.hr_index_of(tokens.examples[[i]])[0]]
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
        writer = QuestionWriter.from_tables(entities["label"].to_pylist(), relations)
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
