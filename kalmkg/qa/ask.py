"""`kalmkg ask`: answer a question from the graph with an exported GGUF, offline, through llama.cpp.

question -> retrieve (link entities, 1-2 hop facts, rank) -> chat prompt with numbered facts -> streamed answer.

No torch on this path: DuckDB for the graph, llama.cpp for both the embeddings that rank facts and the
answer. The model is one GGUF loaded twice over the same memory map: a generation context and an
embedding context (last-token pooling, as KaLM trained it).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from kalmkg.encode import GGUFEncoder
from kalmkg.errors import KalmkgError
from kalmkg.evaluation.calibration import Calibration, read_calibration
from kalmkg.export.registry import list_exports
from kalmkg.llamacpp import runtime
from kalmkg.llamacpp.likelihood import LikelihoodScorer
from kalmkg.models import EMBEDDED, embedded_gguf
from kalmkg.prompts import build_messages
from kalmkg.qa.answer import (
    AnswerGroup,
    answer_names,
    asked_words,
    choose_answer,
    plain_sentence,
    relation_words,
    usable_sentence,
    within,
)
from kalmkg.qa.paraphrase import Scorer, Slot, asks_something, names_a_relation, read_slot, slot_group
from kalmkg.qa.predicted import Asked, LinkPredictor, Prediction, asked_slot, predict_slot
from kalmkg.qa.retrieve import Fact, Link, Retrieval, retrieve
from kalmkg.runs import run_dir
from kalmkg.store import Store
from kalmkg.workspace import Workspace

NO_MATCH = ("Nothing in the graph matches this question: it names no entity of the graph "
            "(`kalmkg entities NAME` looks names up).")
NO_FACTS = "The graph has no facts about {names} to answer from."
NO_ANSWER = "I don't know: no fact of the graph about {names} answers this question."


class Generator(Protocol):
    def stream(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Iterator[str]: ...


@dataclass(frozen=True)
class AskConfig:
    hops: int = 2
    max_facts: int = 8
    no_context: bool = False
    temperature: float = 0.0
    max_tokens: int = 96
    seed: int = 0
    predict: bool = True  # no fact answers a clear question: the link predictor may, said as a prediction
    min_precision: float = 0.5  # ... when its held-out predictions this probable were right this often
    paraphrase: bool = True  # no relation's words in the question: the model reads which one it asks

    def __post_init__(self) -> None:
        if self.hops not in (1, 2):
            raise KalmkgError(f"--hops must be 1 or 2, not {self.hops}")
        if self.max_facts < 1:
            raise KalmkgError("--max-facts must be at least 1")
        if self.max_tokens < 1:
            raise KalmkgError("--max-tokens must be at least 1")
        if self.temperature < 0:
            raise KalmkgError("--temperature must be 0 (greedy) or more")
        if not 0 < self.min_precision <= 1:
            raise KalmkgError("--min-precision must be above 0 and at most 1")


@dataclass
class Answer:
    question: str
    text: str
    matched: bool
    links: list[Link]
    facts: list[Fact]
    descriptions: list[tuple[str, str]] = field(default_factory=list)  # (label, description)
    model: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    chosen: AnswerGroup | None = None  # the answer taken from the graph (None: none, or --no-context)
    sentence: str = "model"  # who wrote `text` around the chosen answer: "model", or "template" (kalmkg)
    predicted: Prediction | None = None  # the link predictor's answer, when no fact answered (said or not)
    read: Slot | None = None  # the slot the model read the question to ask, when its words named none
    notes: list[str] = field(default_factory=list)  # why a prediction could not be made, for stderr

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.text, "matched": self.matched, "model": self.model,
            "chosen": None if self.chosen is None else {
                "entities": [{"key": k, "label": lbl} for _, k, lbl in self.chosen.answers],
                "from": self.chosen.start_label,
                "path": [f.relation_label for f in self.chosen.paths[0].facts],
                "score": round(self.chosen.score, 4), "source": "graph", "chosen_by": self.chosen.chosen_by,
                "sentence": self.sentence},
            "read": None if self.read is None else {
                "entity": self.read.entity.label, "relation": self.read.relation_label,
                "direction": "tail" if self.read.forward else "head", "in_graph": self.read.present,
                "score": round(self.read.score, 4), "form": self.read.form},
            "entities": [{"key": lk.key, "label": lk.label, "mention": lk.mention, "match": lk.match,
                          "score": lk.score} for lk in self.links],
            "facts": [dict(n=i + 1, **f.as_dict()) for i, f in enumerate(self.facts)],
            "descriptions": [{"n": len(self.facts) + i + 1, "entity": lbl, "description": d}
                             for i, (lbl, d) in enumerate(self.descriptions)],
            "predicted": None if self.predicted is None else self.predicted.to_json(),
            "notes": self.notes,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------------------------- prompt


def linked_descriptions(links: Sequence[Link], n: int, max_chars: int = 240) -> list[tuple[str, str]]:
    out = []
    for lk in links[:n]:
        text = " ".join((lk.description or "").split())
        if text:
            out.append((lk.label, text if len(text) <= max_chars else text[: max_chars - 3] + "..."))
    return out


def no_facts_message(links: Sequence[Link]) -> str:
    return NO_FACTS.format(names=", ".join(lk.label for lk in links))


# --------------------------------------------------------------------------------------------- ask


class Beyond(Protocol):
    """Opens the link predictor and its calibration when a question needs them (they load a tokenizer and
    the entity index: seconds, paid only by a question no fact answers)."""

    def __call__(self) -> tuple[LinkPredictor, Calibration] | str: ...  # or why they cannot be had


def ask(store, question: str, generator: Generator, embedder=None, config: AskConfig = AskConfig(),
        on_token: Callable[[str], None] | None = None, beyond: Beyond | None = None,
        scorer: Scorer | None = None) -> Answer:
    """Retrieve, choose the answer from the graph (by the question's words, else by the `scorer` model
    reading which relation it asks), let the model write the sentence around it (streamed to `on_token`
    once checked). No generation when the question names nothing in the graph, or when no fact of the
    graph answers it; then, for a clear question, the link predictor of `beyond` may answer, said as a
    prediction. `--no-context` asks the model alone."""
    question = " ".join(question.split())
    if not question:
        raise KalmkgError("an empty question")
    if config.no_context:
        answer = Answer(question, "", True, [], [], seconds={"retrieve": 0.0})
        return _generate(answer, build_messages(question, [], no_context=True), generator, config, on_token)
    t0 = time.perf_counter()
    found = retrieve(store, question, hops=config.hops, max_facts=config.max_facts, embedder=embedder)
    if not found.matched:
        return _say(Answer(question, NO_MATCH, False, [], []), t0, on_token)
    rows = store.relation_labels()
    relations = relation_words(rows)
    triples = functools.cache(store.triples_array)  # read once, and only by a question no word answers
    chosen = choose_answer(question, found.links, found.paths, relations, embedder)
    asking = asks_something(question, found.links)
    read, seconds = None, {}
    if chosen is None and asking and config.paraphrase and scorer is not None and \
            not names_a_relation(asked_words(question, found.links), relations):
        # no relation's label is in the question: the model reads which one it asks
        t1 = time.perf_counter()
        try:
            read = read_slot(question, found.links, triples(), rows, scorer)
        except ValueError:  # a question longer than the scoring context: the words alone decide
            read = None
        if read is not None and read.present:
            chosen = slot_group(read, found.paths, {lk.id for lk in found.links}, relations)
        seconds["read"] = round(time.perf_counter() - t1, 4)
    if chosen is None and not asking and found.links[0].description:
        # "Who is Marie Curie?", "Paris?": nothing asked but the entity itself: the graph's description
        first = found.links[0]
        described = Answer(question, "", True, found.links, [], [(first.label, " ".join(first.description.split()))])
        described.text = f"{first.label}: {described.descriptions[0][1].rstrip('.')} [1]."
        return _say(described, t0, on_token)
    if chosen is None:
        names = ", ".join(lk.label for lk in found.links)
        text = NO_ANSWER.format(names=names) if found.facts else no_facts_message(found.links)
        answer = Answer(question, text, True, found.links, [], seconds=seconds, read=read)
        if config.predict and beyond is not None:
            _predict(answer, relations, triples(), beyond, config.min_precision)
        return _say(answer, t0, on_token)
    chosen = within(chosen, config.max_facts)
    answer = Answer(question, "", True, found.links, chosen.facts, seconds=seconds, chosen=chosen, read=read)
    _retrieve_seconds(answer, t0)
    messages = build_messages(question, chosen.facts, answer=answer_names(chosen))
    answer = _generate(answer, messages, generator, config, None)
    kept = usable_sentence(answer.text, chosen, _other_entities(found, chosen))
    answer.text, answer.sentence = (kept, "model") if kept is not None else (plain_sentence(chosen), "template")
    if on_token is not None:
        on_token(answer.text)
    return answer


def _predict(answer: Answer, relations, triples, beyond: Beyond, min_precision: float) -> None:
    """The link predictor's answer to a clear question no fact answers: said when reliable enough. The
    slot is the one the question's words name, else the one the model read (which the graph has no
    facts of)."""
    asked = asked_slot(answer.question, asked_words(answer.question, answer.links), answer.links, relations,
                       triples)
    if asked is None and answer.read is not None and not answer.read.present:
        read = answer.read
        asked = Asked(read.entity, read.relation, "tail" if read.forward else "head")
    if asked is None:
        return
    t0 = time.perf_counter()
    try:
        _predict_slot(answer, asked, beyond, min_precision)
    finally:
        answer.seconds["predict"] = round(time.perf_counter() - t0, 4)


def _predict_slot(answer: Answer, asked, beyond: Beyond, min_precision: float) -> None:
    opened = beyond()
    if isinstance(opened, str):
        answer.notes.append(f"no prediction beyond the graph: {opened}")
        return
    predictor, calibration = opened
    answer.predicted = guess = predict_slot(asked, predictor, calibration, min_precision)
    if guess is not None and guess.said:
        answer.text = guess.text()
    elif guess is not None:
        why = (f"no probability reached {min_precision:.0%} precision on held-out facts" if guess.threshold is None
               else f"below {guess.threshold:.2f}, where held-out predictions were right {min_precision:.0%} of the time")
        answer.notes.append(f"not said: the link predictor's first answer, {guess.label} (probability "
                            f"{guess.score:.2f}); {why}")


def _say(answer: Answer, t0: float, on_token) -> Answer:
    """An answer kalmkg gives without the model (no match, nothing that answers, a prediction)."""
    _retrieve_seconds(answer, t0)
    if on_token is not None:
        on_token(answer.text)
    return answer


def _retrieve_seconds(answer: Answer, t0: float) -> None:
    """The time since `t0` less what is reported apart (reading the relation, the prediction)."""
    apart = answer.seconds.get("predict", 0.0) + answer.seconds.get("read", 0.0)
    answer.seconds["retrieve"] = round(time.perf_counter() - t0 - apart, 4)


def _generate(answer: Answer, messages: list[dict], generator: Generator, config: AskConfig, on_token) -> Answer:
    pieces: list[str] = []
    t1 = time.perf_counter()
    for piece in generator.stream(messages, max_tokens=config.max_tokens, temperature=config.temperature,
                                  seed=config.seed):
        if not pieces:
            answer.seconds["first_token"] = round(time.perf_counter() - t1, 4)
        pieces.append(piece)
        if on_token is not None:
            on_token(piece)
    answer.seconds["generate"] = round(time.perf_counter() - t1, 4)
    answer.text = "".join(pieces).strip()
    return answer


def _other_entities(found: Retrieval, chosen: AnswerGroup) -> list[str]:
    """Names of the entities retrieval saw that the chosen facts do not hold: a sentence naming one is not
    the chosen answer."""
    inside = {x for f in chosen.facts for x in (f.head, f.tail)}
    return sorted({label for p in found.paths for f in p.facts for x, label in ((f.head, f.head_label),
                   (f.tail, f.tail_label)) if x not in inside})


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    name: str
    run_id: str | None  # None: not a kalmkg export (the embedded base or any GGUF)


def resolve_model(workspace: Workspace, model: str | None) -> ModelChoice:
    """`--model`: a .gguf path, a name under models/, the embedded base (`smollm2-135m`), or by default the
    newest `kalmkg export` of this workspace."""
    models = workspace.models_dir
    if model is None:
        exports = list_exports(models)
        if not exports:
            raise KalmkgError(f"no exported model in {models}: run `kalmkg export` first, or pass --model "
                              "PATH.gguf (--model smollm2-135m asks the untrained embedded base)")
        path, info = exports[0]
        return ModelChoice(path, path.stem, info.get("run_id"))
    if model.lower() in EMBEDDED:
        return ModelChoice(embedded_gguf(model.lower()), model.lower(), None)
    path = Path(model).expanduser()
    if not path.is_file():
        named = models / (path.name if path.suffix == ".gguf" else f"{path.name}.gguf")
        if not named.is_file():
            raise KalmkgError(f"no model '{model}': pass a .gguf file, a name under {models}, or "
                              f"{', '.join(EMBEDDED)}")
        path = named
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise KalmkgError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise KalmkgError(f"{path} is not a GGUF file")
    info = {}
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = {}
    return ModelChoice(path, path.stem, info.get("run_id"))


class LlamaChat:
    """Chat generation with llama.cpp and the chat template stored in the GGUF."""

    def __init__(self, path: Path, *, n_ctx: int = 4096, n_threads: int | None = None):
        llama_cpp = runtime.load()
        n_threads = n_threads or runtime.default_threads()
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                       n_gpu_layers=runtime.gpu_layers(llama_cpp), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise KalmkgError(f"llama.cpp cannot load {path}: {exc}") from None

    def stream(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        chunks = self.llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens,
                                                 temperature=temperature, seed=seed)
        try:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        except ValueError as exc:  # llama-cpp-python: "Requested tokens (N) exceed context window of M"
            raise KalmkgError(f"the prompt does not fit the model: {exc} (lower --max-facts)") from None


class Asker:
    """The store, a generator and an embedder for one GGUF, opened once and reused across questions."""

    def __init__(self, workspace: Workspace, model: str | None = None, *, n_threads: int | None = None,
                 embed: bool = True):
        self.workspace = workspace
        self.choice = resolve_model(workspace, model)
        n_threads = n_threads or runtime.default_threads()
        self.generator = LlamaChat(self.choice.path, n_threads=n_threads)
        self.embedder = GGUFEncoder(self.choice.path, n_threads=n_threads, truncate=True) if embed else None
        # the embedding context scores too (switched to logits per call): no second KV cache
        self.scorer = LikelihoodScorer(self.embedder.llm) if self.embedder is not None else None
        self._beyond: tuple | str | None = None

    def ask(self, question: str, config: AskConfig = AskConfig(), on_token=None) -> Answer:
        with Store.open(self.workspace) as store:
            answer = ask(store, question, self.generator, self.embedder, config, on_token, self.beyond, self.scorer)
        answer.model = self.choice.name
        return answer

    def beyond(self) -> tuple | str:
        """The run's link predictor (its entity index, queries encoded by this GGUF) and its calibration,
        opened once; or why there is none."""
        if self._beyond is None:
            self._beyond = open_beyond(self.workspace, self.choice, self.embedder)
        return self._beyond


def open_beyond(workspace: Workspace, choice: ModelChoice, embedder=None) -> tuple | str:
    """(Predictor, Calibration) for the run `choice` was exported from, or why they cannot be had."""
    if choice.run_id is None:
        return f"{choice.name} is not exported from a run of this workspace"
    calibration = read_calibration(run_dir(workspace, choice.run_id))
    if calibration is None:
        return f"run {choice.run_id} is not calibrated; `kalmkg evaluate --split valid --run {choice.run_id}` does it"
    try:
        predictor = open_predictor(workspace, choice, embedder)
    except KalmkgError as exc:
        return str(exc)
    if (calibration.model, calibration.weights) != (predictor.loaded.fingerprint, predictor.loaded.weights):
        return (f"the weights of run {choice.run_id} changed since it was calibrated; "
                f"`kalmkg evaluate --split valid --run {choice.run_id}` calibrates it again")
    return predictor, calibration


def open_predictor(workspace: Workspace, choice: ModelChoice, embedder=None):
    """The link predictor of the run `choice` was exported from: its entity index, queries encoded by this
    GGUF. No torch: the entity texts are cut by the GGUF's own tokenizer."""
    from kalmkg.loaded import load_model
    from kalmkg.prediction import Predictor

    if choice.run_id is None:
        raise KalmkgError(f"{choice.name} is not exported from a run of this workspace: no link predictor")
    if embedder is None:
        embedder = GGUFEncoder(choice.path, truncate=True)
    loaded = load_model(workspace, run=choice.run_id, tokenizer=embedder.text_tokenizer())
    return Predictor.open(workspace, loaded=loaded, backend="gguf", encoder=embedder)
