"""The chat prompts `kalmkg ask` sends, in one place: training writes its question-answer examples in the
same turns, so what the model learns is what it is later asked."""

from __future__ import annotations

SYSTEM = ("You answer questions about a knowledge graph. Use only the numbered facts below. "
          "Answer in one short sentence and cite the facts you used like [1]. "
          "If the facts do not answer the question, say: I don't know.")
SYSTEM_ANSWER = ("You answer questions about a knowledge graph. The answer was found in the numbered facts "
                 "below. Write one short sentence that gives the answer and cite the facts like [1].")
SYSTEM_NO_CONTEXT = "Answer the question in one short sentence. If you do not know the answer, say: I don't know."


def no_context_messages(question: str) -> list[dict]:
    """The model alone (`ask --no-context`): the rules, then the question."""
    return [{"role": "system", "content": SYSTEM_NO_CONTEXT}, {"role": "user", "content": question}]
