"""Grading `kalmkg ask` answers against a question set (bench/ask_quality.py, the tests): benchmark
evaluation, kept off the path that answers a question.

A question set is a JSONL file, one {"id", "question", "kind": one-hop|two-hop|no-answer, "answers": [...]}
per line. An answerable question is right when an expected name appears in the answer and the answer does
not abstain; a question with no expected answer is right when the answer abstains: says it does not know,
or is one of the messages `ask` gives instead of generating.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from kalmkg.errors import KalmkgError
from kalmkg.qa.ask import NO_FACTS, NO_MATCH
from kalmkg.text import normalize, normalize_sentence

# read on `normalize_sentence` text: apostrophes kept
_ABSTAIN = re.compile(r"\b(i don'?t know|i do not know|not (?:mentioned|stated|given|provided|in the (?:facts|graph))|"
                      r"no information|cannot (?:answer|determine)|can'?t (?:answer|determine)|unknown)\b")
_NO_FACTS_START, _NO_FACTS_END = NO_FACTS.split("{names}")


def is_abstention(text: str) -> bool:
    """Whether an answer declines: an "I don't know" of the model, or `ask`'s no-match or no-facts message."""
    text = text.strip()
    return bool(_ABSTAIN.search(normalize_sentence(text))) or text == NO_MATCH or (
        text.startswith(_NO_FACTS_START) and text.endswith(_NO_FACTS_END))


def grade(answer: str, expected: Sequence[str]) -> bool:
    """Right when an expected name appears in the answer (accents, case and punctuation ignored) and the
    answer does not abstain; a question with no expected answer is right when the answer abstains."""
    if not expected:
        return is_abstention(answer)
    if is_abstention(answer):
        return False
    said = f" {normalize(answer)} "
    return any(f" {normalize(e)} " in said for e in expected)


def load_questions(path: Path) -> list[dict]:
    """A JSONL file of {"id", "question", "kind": one-hop|two-hop|no-answer, "answers": [...], ...}."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise KalmkgError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise KalmkgError(f"{path}:{n}: each line needs a \"question\" string")
        out.append(row)
    return out
