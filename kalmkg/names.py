"""Entity and relation names as users type them -> store ids, with helpful errors.

Entities: a key (IRI or id) or a label, case-insensitive, or an IRI's local name (`New_York`), through
`Store.find_entities` (one ranking of exact, prefix, substring and fuzzy matches for every command).
Relations: key, label or local name (`capital_of`, `capital of`), case-insensitive; a graph has few
relations, so they are matched here from `Store.relation_table()` instead of another SQL query.

A miss lists the closest names ("no entity 'Pari'; did you mean: Paris, Parisii?"); a name that several
entities share lists them with their keys and asks for a key. Messages are one line (the CLI prints
them as `error: ...`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from kalmkg.errors import KalmkgError
from kalmkg.text import local_name, normalize_typed_name

_SUGGESTIONS = 5
_CANDIDATES = 50  # exact matches looked at before calling a name ambiguous


@dataclass(frozen=True)
class EntityRef:
    id: int
    key: str
    label: str


@dataclass(frozen=True)
class RelationRef:
    id: int
    key: str
    label: str


def _short(text: str | None, width: int = 40) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def resolve_entity(store, name: str) -> EntityRef:
    """The one entity `name` denotes; KalmkgError with suggestions or candidates otherwise."""
    query = name.strip()
    if not query:
        raise KalmkgError("an empty entity name")
    matches = store.find_entities(query, limit=_CANDIDATES)
    for m in matches:
        if m["match"] == "key":
            return EntityRef(m["id"], m["key"], m["label"])
    exact = [m for m in matches if m["match"] == "exact"]
    if len(exact) == 1:
        m = exact[0]
        return EntityRef(m["id"], m["key"], m["label"])
    if exact:
        more = " (and more)" if len(exact) == _CANDIDATES else ""
        listed = "; ".join(f"{m['key']} ({m['label']}{', ' + _short(m['description']) if m['description'] else ''})"
                           for m in exact[:10])
        raise KalmkgError(f"entity '{query}' is ambiguous: {len(exact)} entities match{more}: {listed}; "
                          "give the key instead")
    raise KalmkgError(_miss("entity", query, _label_suggestions(matches)))


def _label_suggestions(matches: list[dict]) -> list[str]:
    """Labels of the best near matches; a label that several of them share gets its key."""
    best = matches[:_SUGGESTIONS]
    counts: dict[str, int] = {}
    for m in best:
        counts[m["label"]] = counts.get(m["label"], 0) + 1
    return [m["label"] if counts[m["label"]] == 1 else f"{m['label']} ({m['key']})" for m in best]


def _miss(kind: str, query: str, suggestions: list[str]) -> str:
    if suggestions:
        return f"no {kind} '{query}'; did you mean: {', '.join(suggestions)}?"
    hint = f" (try `kalmkg entities {query!r}`)" if kind == "entity" else ""
    return f"no {kind} '{query}'{hint}"


def resolve_relation(store, name: str, relation_table=None) -> RelationRef:
    """The one relation `name` denotes (key, label or local name; case-insensitive)."""
    query = name.strip()
    if not query:
        raise KalmkgError("an empty relation name")
    table = relation_table if relation_table is not None else store.relation_table()
    rows = [RelationRef(i, k, lbl) for i, k, lbl in zip(table["id"].to_pylist(), table["key"].to_pylist(),
                                                        table["label"].to_pylist())]
    for r in rows:
        if r.key == query:
            return r
    q = normalize_typed_name(query)
    exact = [r for r in rows if q in map(normalize_typed_name, (r.label, r.key, local_name(r.key)))]
    if len(exact) == 1:
        return exact[0]
    if exact:
        listed = "; ".join(f"{r.key} ({r.label})" for r in exact[:10])
        raise KalmkgError(f"relation '{query}' is ambiguous: {len(exact)} relations match: {listed}; "
                          "give the key instead")
    raise KalmkgError(_relation_miss(query, rows))


def _relation_miss(query: str, rows: list[RelationRef]) -> str:
    q = normalize_typed_name(query)
    names: dict[str, RelationRef] = {}
    for r in rows:
        for form in (normalize_typed_name(r.label), normalize_typed_name(local_name(r.key))):
            names.setdefault(form, r)
    close = [names[m] for m in difflib.get_close_matches(q, list(names), n=_SUGGESTIONS, cutoff=0.6)]
    close += [r for form, r in names.items() if (form.startswith(q) or q in form) and r not in close]
    seen, labels = set(), []
    for r in close:
        if r.id not in seen:
            seen.add(r.id)
            labels.append(r.label)
    if labels:
        return _miss("relation", query, labels[:_SUGGESTIONS])
    if len(rows) <= 20:
        return f"no relation '{query}'; the graph's relations: {', '.join(sorted(r.label for r in rows))}"
    return f"no relation '{query}' (`kalmkg stats` lists the relations)"
