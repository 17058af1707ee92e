"""Property-based tests (hypothesis): a graph written in any format kalmkg reads comes back from the store
as it was written; names resolve to the entity they name; the split is a partition whose held-out triples
only use what train has."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalmkg.errors import KalmkgError

EX = "http://example.org/"
# Labels in any script, with punctuation, quotes and backslashes; no control characters (TSV holds no tab
# or newline in a field), no surrogates (not text), no unassigned or private code points (XML 1.0 forbids
# U+FFFE and U+FFFF, so an RDF/XML writer cannot write them).
LABEL = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co", "Zl", "Zp")), min_size=1, max_size=24) \
    .map(lambda s: " ".join(s.split())).filter(bool)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def graphs(draw, label=LABEL):
    """(labels of entities 0..n-1, relation count, triples (h, r, t) as indices)."""
    n = draw(st.integers(2, 9))
    labels = draw(st.lists(label, min_size=n, max_size=n))
    r = draw(st.integers(1, 3))
    triples = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, r - 1), st.integers(0, n - 1)),
                            min_size=1, max_size=25, unique=True))
    return labels, r, sorted(triples)


def _write(folder: Path, fmt: str, labels: list[str], r: int, triples: list) -> tuple[Path, callable, callable]:
    """The graph as a file (or folder) of `fmt`; the keys its entities and relations get in the store."""
    if fmt == "tsv":
        path = folder / "graph"
        path.mkdir()
        (path / "train.tsv").write_text("".join(f"e{h}\tr{x}\te{t}\n" for h, x, t in triples), encoding="utf-8")
        # id, label, description: the label kept whole (a 2-column "name, description" text may be split)
        (path / "entity2text.txt").write_text("".join(f"e{i}\t{lab}\tan entity\n" for i, lab in enumerate(labels)),
                                              encoding="utf-8")
        return path, (lambda i: f"e{i}"), (lambda x: f"r{x}")
    import rdflib

    g = rdflib.Graph()
    for h, x, t in triples:
        g.add((rdflib.URIRef(f"{EX}e{h}"), rdflib.URIRef(f"{EX}r{x}"), rdflib.URIRef(f"{EX}e{t}")))
    used = {i for h, _, t in triples for i in (h, t)}
    for i in used:
        g.add((rdflib.URIRef(f"{EX}e{i}"), rdflib.RDFS.label, rdflib.Literal(labels[i])))
    suffix = {"nt": ".nt", "turtle": ".ttl", "xml": ".rdf", "json-ld": ".jsonld", "trig": ".trig"}[fmt]
    path = folder / f"graph{suffix}"
    if fmt == "trig":
        ds = rdflib.Dataset()
        named = ds.graph(rdflib.URIRef(f"{EX}g"))
        for triple in g:
            named.add(triple)
        ds.serialize(path, format="trig", encoding="utf-8")
    else:
        g.serialize(path, format=fmt, encoding="utf-8")
    return path, (lambda i: f"{EX}e{i}"), (lambda x: f"{EX}r{x}")


def _stored(path: Path) -> tuple[set, dict]:
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        with Store.open(Workspace(Path(tmp) / "ws"), create=True) as store:
            ingest(store, resolve_sources([path]))
            entities = store.entity_table().to_pylist()
            relations = store.relation_table().column("key").to_pylist()
            keys = [e["key"] for e in entities]
            triples = {(keys[h], relations[r], keys[t]) for h, r, t in store.triples_array().tolist()}
    return triples, {e["key"]: e["label"] for e in entities}


@pytest.mark.parametrize("fmt", ["tsv", "nt", "turtle", "trig", "xml", "json-ld"])
@SETTINGS
@given(graph=graphs())
def test_a_graph_comes_back_from_the_store_as_it_was_written(fmt, graph):
    labels, r, triples = graph
    with tempfile.TemporaryDirectory() as tmp:
        path, entity_key, relation_key = _write(Path(tmp), fmt, labels, r, triples)
        stored, stored_labels = _stored(path)
    assert stored == {(entity_key(h), relation_key(x), entity_key(t)) for h, x, t in triples}
    used = {i for h, _, t in triples for i in (h, t)}
    assert {entity_key(i): stored_labels.get(entity_key(i)) for i in used} == {entity_key(i): labels[i] for i in used}


def _distinct_names(labels: list[str]) -> bool:
    lowered = [lab.lower() for lab in labels]
    return len(set(lowered)) == len(lowered) and not any(lab.startswith("e") and lab[1:].isdigit() for lab in lowered)


@SETTINGS
@given(graph=graphs(label=st.text("abcdefghijklmnopqrstuvwxyzABCDEZ éü-'.,0123", min_size=1, max_size=16)
                   .map(lambda s: " ".join(s.split())).filter(bool)))
def test_every_key_and_every_distinct_label_resolves_to_its_entity(graph):
    from kalmkg.names import resolve_entity
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    labels, r, triples = graph
    used = sorted({i for h, _, t in triples for i in (h, t)})
    with tempfile.TemporaryDirectory() as tmp:
        path, entity_key, _ = _write(Path(tmp), "tsv", labels, r, triples)
        from kalmkg.ingestion import ingest, resolve_sources

        with Store.open(Workspace(Path(tmp) / "ws"), create=True) as store:
            ingest(store, resolve_sources([path]))
            for i in used:
                assert resolve_entity(store, entity_key(i)).key == entity_key(i)
            for i in used:  # entity2text.txt names every entity, also those in no triple
                if _distinct_names(labels):
                    assert resolve_entity(store, labels[i]).key == entity_key(i)
                    assert resolve_entity(store, labels[i].swapcase()).key == entity_key(i)  # ASCII case
                else:  # a shared name resolves to an entity of that name, or is refused with the candidates
                    try:
                        ref = resolve_entity(store, labels[i])
                    except KalmkgError as exc:
                        assert "ambiguous" in str(exc) and entity_key(i) in str(exc)
                    else:
                        assert ref.label.lower() == labels[i].lower() or ref.key == labels[i]


@SETTINGS
@given(graph=graphs(), valid=st.floats(0, 0.4), test=st.floats(0, 0.4), seed=st.integers(0, 2**16))
def test_the_split_is_a_partition_and_held_out_triples_only_use_what_train_has(graph, valid, test, seed):
    from kalmkg.split import TEST, TRAIN, VALID, transductive_split

    _, _, triples = graph
    h, r, t = (np.array(col, dtype=np.int64) for col in zip(*triples))
    n_valid, n_test = int(valid * len(h)), int(test * len(h))
    codes = transductive_split(h, r, t, n_valid, n_test, seed)
    assert len(codes) == len(h) and set(codes.tolist()) <= {TRAIN, VALID, TEST}
    assert (codes == VALID).sum() <= n_valid and (codes == TEST).sum() <= n_test
    train = codes == TRAIN
    seen_entities, seen_relations = set(h[train]) | set(t[train]), set(r[train])
    held = ~train
    assert set(h[held]) | set(t[held]) <= seen_entities and set(r[held]) <= seen_relations
    assert np.array_equal(codes, transductive_split(h, r, t, n_valid, n_test, seed))  # the seed decides
