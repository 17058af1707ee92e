"""The chat prompts `kalmkg ask` sends, in one place: training writes its question-answer examples in the
same turns, so what the model learns is what it is later asked."""

from __future__ import annotations

from typing import Protocol, Sequence

SYSTEM = ("You answer questions about a knowledge graph. Use only the numbered facts below. "
          "Answer in one short sentence and cite the facts you used like [1]. "
          "If the facts do not answer the question, say: I don't know.")
SYSTEM_ANSWER = ("You answer questions about a knowledge graph. The answer was found in the numbered facts "
                 "below. Write one short sentence that gives the answer and cite the facts like [1].")
SYSTEM_NO_CONTEXT = "Answer the question in one short sentence. If you do not know the answer, say: I don't know."


def no_context_messages(question: str) -> list[dict]:
    """The model alone (`ask --no-context`): the rules, then the question."""
    return [{"role": "system", "content": SYSTEM_NO_CONTEXT}, {"role": "user", "content": question}]


def join_names(labels: Sequence[str]) -> str:
    """"A", "A and B", "A, B and C": how an answer of several entities is written."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


class Numbered(Protocol):
    """A fact as a prompt numbers it (`kalmkg.qa.retrieve.Fact`, or training's own)."""

    def text(self) -> str: ...


def fact_text(head: str, relation: str, tail: str) -> str:
    """How a fact is written in a prompt (and embedded)."""
    return f"{head} — {relation} — {tail}"


def context_lines(facts: Sequence[Numbered], descriptions: Sequence[tuple[str, str]] = ()) -> list[str]:
    """"[1] fact", ..., then "[n] entity: description"."""
    lines = [f"[{i + 1}] {f.text()}" for i, f in enumerate(facts)]
    lines += [f"[{len(facts) + i + 1}] {label}: {text}" for i, (label, text) in enumerate(descriptions)]
    return lines


def build_messages(question: str, facts: Sequence[Numbered], descriptions: Sequence[tuple[str, str]] = (),
                   no_context: bool = False, answer: str | None = None) -> list[dict]:
    """The chat: a system turn with the rules, a user turn with the numbered facts and the question (and,
    when the graph gave it, the answer the sentence must give)."""
    if no_context:
        return no_context_messages(question)
    body = "Facts:\n" + "\n".join(context_lines(facts, descriptions)) + f"\n\nQuestion: {question}"
    if answer is not None:
        return [{"role": "system", "content": SYSTEM_ANSWER}, {"role": "user", "content": f"{body}\nAnswer: {answer}"}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]
