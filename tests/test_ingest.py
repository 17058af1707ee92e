"""`kalmkg.ingestion`: formats, labels and languages, blank nodes, attributes, idempotence, atomicity, TSV,
and the benchmark folders (WN18RR, UMLS)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import rdflib

from helpers_graph import (
    DATASETS, PREFIXES, SAMPLE_TTL, XSD, dump, dump_con, graph_of, ingest_into, ingest_read, query, write,
)
from kalmkg.errors import KalmkgError
from kalmkg.ingestion import ingest, resolve_sources
from kalmkg.store import Store
from kalmkg.workspace import Workspace

EX = "http://example.org/rt/"

# ---------------------------------------------------------------------------------------------------------
# 1. The same small graph in every format gives the same store
# ---------------------------------------------------------------------------------------------------------
ROUND_TRIP_TTL = """\
@prefix ex: <http://example.org/rt/> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
@prefix xsd: <http://www.w3.org/2001/XMLSchema#> .

ex:capital_of rdfs:label "capital of"@en ; rdfs:comment "The country whose capital the city is."@en .
ex:located_in rdfs:label "located in"@en .
ex:founded_by rdfs:label "founded by"@en .
# A property with a label that only ever has literal values: an attribute, not an entity.
ex:population rdfs:label "population"@en .

ex:Paris rdfs:label "Paris"@en ; rdfs:comment "Capital city of France."@en ;
    ex:capital_of ex:France ; ex:located_in ex:France ; ex:population 2100000 .
ex:France rdfs:label "France"@en ; rdfs:comment "A country in Western Europe."@en ;
    ex:located_in ex:Europe .
ex:Europe rdfs:label "Europe"@en ; rdfs:comment "A continent."@en .
ex:Berlin rdfs:label "Berlin"@en ; rdfs:comment "Capital city of Germany."@en ;
    ex:capital_of ex:Germany ; ex:located_in ex:Germany ; ex:population 3600000 .
ex:Germany rdfs:label "Germany"@en ; rdfs:comment "A country in Central Europe."@en ;
    ex:located_in ex:Europe .
ex:Lyon rdfs:label "Lyon"@en ; ex:located_in ex:France ; ex:nickname "Capitale des Gaules"@fr .
ex:Acme rdfs:label "Acme Corporation"@en ; rdfs:comment "A company, founded in 1920."@en ;
    ex:founded_by ex:Jane_Doe ; ex:inception "1920-05-01"^^xsd:date .
ex:Jane_Doe rdfs:label "Jane Doe"@en ; rdfs:comment "Founder of Acme."@en .
ex:Quebec_City ex:located_in ex:Canada .
ex:Canada rdfs:label "Canada"@en ; rdfs:comment "A country in North America."@en ;
    ex:motto "A mari usque ad mare" .
"""

EXPECTED_ENTITIES = {
    EX + "Paris": ("Paris", "Capital city of France."),
    EX + "France": ("France", "A country in Western Europe."),
    EX + "Europe": ("Europe", "A continent."),
    EX + "Berlin": ("Berlin", "Capital city of Germany."),
    EX + "Germany": ("Germany", "A country in Central Europe."),
    EX + "Lyon": ("Lyon", None),
    EX + "Acme": ("Acme Corporation", "A company, founded in 1920."),
    EX + "Jane_Doe": ("Jane Doe", "Founder of Acme."),
    EX + "Quebec_City": ("Quebec City", None),  # no label: from the IRI's local name
    EX + "Canada": ("Canada", "A country in North America."),
}
EXPECTED_RELATIONS = {
    EX + "capital_of": ("capital of", "The country whose capital the city is."),
    EX + "located_in": ("located in", None),
    EX + "founded_by": ("founded by", None),
}
EXPECTED_TRIPLES = {
    (EX + h, EX + r, EX + t, "train") for h, r, t in [
        ("Paris", "capital_of", "France"), ("Paris", "located_in", "France"), ("France", "located_in", "Europe"),
        ("Berlin", "capital_of", "Germany"), ("Berlin", "located_in", "Germany"),
        ("Germany", "located_in", "Europe"), ("Lyon", "located_in", "France"), ("Acme", "founded_by", "Jane_Doe"),
        ("Quebec_City", "located_in", "Canada"),
    ]
}
EXPECTED_ATTRIBUTES = {
    (EX + "Paris", EX + "population", "2100000", XSD + "integer", ""),
    (EX + "Berlin", EX + "population", "3600000", XSD + "integer", ""),
    (EX + "Lyon", EX + "nickname", "Capitale des Gaules", "", "fr"),
    (EX + "Acme", EX + "inception", "1920-05-01", XSD + "date", ""),
    (EX + "Canada", EX + "motto", "A mari usque ad mare", "", ""),
}


def _round_trip_tsv(folder: Path) -> Path:
    """The same graph as a TSV folder: IRIs as ids, labels and descriptions in entities.tsv/relations.tsv."""
    write(folder / "triples.tsv", "".join(f"{h}\t{r}\t{t}\n" for h, r, t, _ in sorted(EXPECTED_TRIPLES)))
    rows = []
    for key, (label, desc) in sorted(EXPECTED_ENTITIES.items()):
        if key == EX + "Quebec_City":
            continue  # no text: the fallback label must come out the same as for RDF
        rows.append(f"{key}\t{label}\t{desc}\n" if desc else f"{key}\t{label}\n")
    write(folder / "entities.tsv", "".join(rows))
    write(folder / "relations.tsv", "".join(
        f"{k}\t{lbl}\t{d}\n" if d else f"{k}\t{lbl}\n" for k, (lbl, d) in sorted(EXPECTED_RELATIONS.items())))
    return folder


def _write_format(tmp_path: Path, fmt: str) -> Path:
    graph = rdflib.Graph()
    graph.parse(data=ROUND_TRIP_TTL, format="turtle")
    if fmt == "turtle":
        return write(tmp_path / "g.ttl", ROUND_TRIP_TTL)
    if fmt == "tsv":
        return _round_trip_tsv(tmp_path / "g_tsv")
    if fmt in ("nquads", "trig"):
        # Spread the triples over two named graphs and the default graph: all of them count.
        ds = rdflib.Dataset()
        graphs = [ds.graph(rdflib.URIRef("http://example.org/g1")), ds.graph(rdflib.URIRef("http://example.org/g2")),
                  ds.default_graph]
        for i, triple in enumerate(sorted(graph)):
            graphs[i % 3].add(triple)
        path = tmp_path / ("g.nq" if fmt == "nquads" else "g.trig")
        ds.serialize(destination=str(path), format=fmt)
        return path
    ext, rdflib_fmt = {"ntriples": ("nt", "nt"), "rdfxml": ("rdf", "xml"), "jsonld": ("jsonld", "json-ld")}[fmt]
    path = tmp_path / f"g.{ext}"
    graph.serialize(destination=str(path), format=rdflib_fmt, encoding="utf-8")
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # rdflib's own TriG/N-Quads code
@pytest.mark.parametrize("fmt", ["turtle", "ntriples", "rdfxml", "jsonld", "nquads", "trig", "tsv"])
def test_round_trip_same_store_contents(tmp_path, fmt):
    path = _write_format(tmp_path, fmt)
    results, got = ingest_read(tmp_path / "ws", [path])
    assert len(results) == 1 and not results[0].skipped
    assert got["triples"] == EXPECTED_TRIPLES
    assert got["entities"] == EXPECTED_ENTITIES
    assert got["relations"] == EXPECTED_RELATIONS
    # TSV has no literals; every RDF format keeps the same attributes (datatype and language included).
    assert got["attributes"] == (set() if fmt == "tsv" else EXPECTED_ATTRIBUTES)
    c = results[0].counts
    assert (c.entities, c.relations, c.triples) == (10, 3, 9)
    assert c.attributes == (0 if fmt == "tsv" else 5)


def test_round_trip_ids_are_dense_and_in_key_order(tmp_path):
    _, got = ingest_read(tmp_path / "ws", [_write_format(tmp_path, "turtle")])
    assert got["entity_ids"] == {k: i for i, k in enumerate(sorted(EXPECTED_ENTITIES))}
    assert got["relation_ids"] == {k: i for i, k in enumerate(sorted(EXPECTED_RELATIONS))}


def test_attribute_language_tag_case_is_the_same_in_every_format(tmp_path):
    ttl = PREFIXES + 'ex:a ex:p ex:b ; ex:spelling "Colour"@en-GB .\n'
    write(tmp_path / "a.ttl", ttl)
    g = rdflib.Graph().parse(data=ttl, format="turtle")
    g.serialize(destination=str(tmp_path / "a.nt"), format="nt", encoding="utf-8")
    _, ttl = ingest_read(tmp_path / "ws_ttl", [tmp_path / "a.ttl"])
    _, nt = ingest_read(tmp_path / "ws_nt", [tmp_path / "a.nt"])
    assert ttl["attributes"] == nt["attributes"]


def test_attribute_lexical_forms_are_the_same_in_turtle_and_ntriples(tmp_path):
    write(tmp_path / "a.ttl", PREFIXES + 'ex:a ex:p ex:b ; ex:count "0042"^^xsd:integer ; ex:size 1.5e3 .\n')
    write(tmp_path / "a.nt",
          '<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n'
          f'<http://x.org/a> <http://x.org/count> "0042"^^<{XSD}integer> .\n'
          f'<http://x.org/a> <http://x.org/size> "1.5e3"^^<{XSD}double> .\n')
    _, ttl = ingest_read(tmp_path / "ws_ttl", [tmp_path / "a.ttl"])
    _, nt = ingest_read(tmp_path / "ws_nt", [tmp_path / "a.nt"])
    assert ttl["attributes"] == nt["attributes"]


def test_format_option_overrides_extension(tmp_path):
    path = write(tmp_path / "graph.txt", ROUND_TRIP_TTL)  # .txt would be read as TSV
    results, got = ingest_read(tmp_path / "ws", [path], fmt="turtle")
    assert results[0].format == "turtle"
    assert got["triples"] == EXPECTED_TRIPLES


# ---------------------------------------------------------------------------------------------------------
# 2. Language preference and label predicates
# ---------------------------------------------------------------------------------------------------------
LANG_CASES = [
    # (objects of the entity's text predicates, --lang, expected label)
    ('rdfs:label "Paris FR"@fr, "Paris EN"@en, "Paris plain"', "en", "Paris EN"),
    ('rdfs:label "Paris FR"@fr, "Paris EN"@en, "Paris plain"', "fr", "Paris FR"),
    ('rdfs:label "Paris FR"@fr, "Paris EN"@en, "Paris plain"', "de", "Paris plain"),
    ('rdfs:label "Colour FR"@fr, "Colour GB"@en-GB, "Colour DE"@de', "en", "Colour GB"),
    ('rdfs:label "Colour US"@en-US, "Colour plain"', "en", "Colour US"),
    ('rdfs:label "Hallo"@de, "Plain"', "en", "Plain"),
    ('rdfs:label "Hallo"@de', "en", "Hallo"),
    ('rdfs:label "Upper"@EN, "Plain"', "en", "Upper"),  # language tags compare case-insensitively
    ('rdfs:label "Lower"@en, "Plain"', "EN", "Lower"),
    # rdfs:label beats schema:name at the same language, whatever the values or their order
    ('schema:name "Aardvark"@en ; rdfs:label "Zebra"@en', "en", "Zebra"),
    ('rdfs:label "Zebra"@en ; schema:name "Aardvark"@en', "en", "Zebra"),
    ('foaf:name "Aardvark"@en ; skos:prefLabel "Zebra"@en', "en", "Zebra"),
    ('foaf:name "Aardvark" ; schema:name "Zebra"', "en", "Zebra"),
    # ... but the language comes first: a preferred-language schema:name beats an untagged rdfs:label
    ('rdfs:label "Plain label" ; schema:name "English name"@en', "en", "English name"),
    ('rdfs:label "Deutsch"@de ; foaf:name "Français"@fr', "fr", "Français"),
]


@pytest.fixture(scope="module")
def labels_by_lang(tmp_path_factory):
    """Every LANG_CASES entry as its own entity ex:c<i> of one file, ingested once per --lang value
    (the choice is per entity, so the cases do not interfere)."""
    root = tmp_path_factory.mktemp("lang")
    body = "".join(f"ex:c{i} {texts} ; ex:p ex:b .\n" for i, (texts, _, _) in enumerate(LANG_CASES))
    path = write(root / "labels.ttl", PREFIXES + body)
    cache: dict = {}

    def labels(lang: str) -> dict:
        if lang not in cache:
            _, got = ingest_read(root / f"ws_{lang}", [path], lang=lang)
            cache[lang] = {k: label for k, (label, _) in got["entities"].items()}
        return cache[lang]

    return labels


@pytest.mark.parametrize("case", range(len(LANG_CASES)),
                         ids=[f"{lang}:{expected}" for _, lang, expected in LANG_CASES])
def test_label_language_and_predicate_preference(labels_by_lang, case):
    _, lang, expected = LANG_CASES[case]
    assert labels_by_lang(lang)[f"http://x.org/c{case}"] == expected


def test_description_language_and_predicate_preference(tmp_path):
    path = write(tmp_path / "d.ttl", PREFIXES + (
        'ex:a rdfs:comment "Texte français"@fr, "Plain text" ; schema:description "English text"@en ;\n'
        '     skos:definition "Zz English definition"@en ; ex:p ex:b .\n'))
    for lang, expected in [("en", "English text"), ("fr", "Texte français"), ("it", "Plain text")]:
        _, got = ingest_read(tmp_path / f"ws_{lang}", [path], lang=lang)
        assert got["entities"]["http://x.org/a"] == ("a", expected), lang


def test_description_predicate_rank(tmp_path):
    path = write(tmp_path / "d.ttl", PREFIXES + (
        '@prefix dct: <http://purl.org/dc/terms/> .\n'
        'ex:a dct:description "A dcterms"@en ; skos:definition "B skos"@en ; ex:p ex:b .\n'
        'ex:b dct:description "A dcterms"@en ; skos:definition "B skos"@en ; schema:description "C schema"@en .\n'
        'ex:c schema:description "A schema"@en ; rdfs:comment "B comment"@en ; ex:p ex:a .\n'))
    _, got = ingest_read(tmp_path / "ws", [path])
    assert {k: d for k, (_, d) in got["entities"].items()} == {
        "http://x.org/a": "B skos", "http://x.org/b": "C schema", "http://x.org/c": "B comment"}


def test_relation_labels_follow_the_language_preference(tmp_path):
    path = write(tmp_path / "r.ttl", PREFIXES + (
        'ex:p rdfs:label "est lié à"@fr, "is linked to"@en ; rdfs:comment "A link."@en .\n'
        'ex:a ex:p ex:b .\n'))
    _, got = ingest_read(tmp_path / "ws", [path], lang="fr")
    assert got["relations"] == {"http://x.org/p": ("est lié à", "A link.")}
    assert set(got["entities"]) == {"http://x.org/a", "http://x.org/b"}


def test_later_ingest_in_another_language_keeps_preferred_label(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "one.ttl", PREFIXES + 'ex:a rdfs:label "Paris"@en ; ex:p ex:b .\n')])
    _, got = ingest_read(ws, [write(tmp_path / "two.ttl", PREFIXES + 'ex:a rdfs:label "Paname"@fr ; ex:q ex:c .\n')],
                         lang="en")
    assert got["entities"]["http://x.org/a"][0] == "Paris"


def test_later_ingest_updates_texts_and_counts_them(tmp_path):
    ws = tmp_path / "ws"
    _, got = ingest_read(ws, [write(tmp_path / "one.ttl", PREFIXES + 'ex:a ex:p ex:b .\n')])
    assert got["entities"]["http://x.org/a"] == ("a", None)
    results, got = ingest_read(ws, [write(tmp_path / "two.ttl", PREFIXES + (
        'ex:a rdfs:label "Alpha"@en ; rdfs:comment "First letter."@en .\nex:b rdfs:label "b" .\n'))])
    assert results[0].counts.texts_updated == 1  # ex:b's label is unchanged
    assert results[0].counts.entities == 0
    assert got["entities"]["http://x.org/a"] == ("Alpha", "First letter.")


# ---------------------------------------------------------------------------------------------------------
# 3. Fallback labels from the IRI's local name
# ---------------------------------------------------------------------------------------------------------
FALLBACK_CASES = [
    ("http://x.org/New_York", "New York"),
    ("http://x.org/a#b_c", "b c"),
    ("http://x.org/S%C3%A3o_Paulo", "São Paulo"),
    ("http://x.org/Caf%C3%A9%20du%20Monde", "Café du Monde"),
    ("http://x.org/places/Berlin/", "Berlin"),
    ("http://x.org/ns#", "ns"),
    ("urn:isbn:0451450523", "0451450523"),
    ("http://x.org/C%2B%2B", "C++"),
]


@pytest.fixture(scope="module")
def fallback_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    path = write(root / "f.nt", "".join(f"<{iri}> <http://x.org/rel#linked_to> <http://x.org/Other> .\n"
                                        for iri, _ in FALLBACK_CASES))
    return ingest_read(root / "ws", [path])[1]


@pytest.mark.parametrize("iri, label", FALLBACK_CASES)
def test_fallback_label_from_iri_local_name(fallback_store, iri, label):
    assert fallback_store["entities"][iri] == (label, None)


def test_fallback_label_of_a_relation(fallback_store):
    assert fallback_store["relations"] == {"http://x.org/rel#linked_to": ("linked to", None)}


def test_fallback_labels_for_tsv_ids(tmp_path):
    _, got = ingest_read(tmp_path / "ws", [write(tmp_path / "t.tsv", "Ada_Lovelace\tborn_in\tLondon\n")])
    assert got["entities"] == {"Ada_Lovelace": ("Ada Lovelace", None), "London": ("London", None)}
    assert got["relations"] == {"born_in": ("born in", None)}


# ---------------------------------------------------------------------------------------------------------
# 4. Blank nodes
# ---------------------------------------------------------------------------------------------------------
BNODE_TTL = PREFIXES + """\
ex:Marie rdfs:label "Marie"@en ;
    ex:award [ rdfs:label "Nobel Prize in Physics"@en ; ex:year 1903 ] ,
             [ rdfs:label "Nobel Prize in Chemistry"@en ; ex:year 1911 ] ;
    ex:address [ ex:city ex:Paris ; ex:street [ ex:name_of_street "Rue Cuvier" ] ] .
"""


def _bnodes(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot["entities"].items() if k.startswith("_:")}


def test_blank_nodes_get_stable_keys_across_workspaces(tmp_path):
    path = write(tmp_path / "b.ttl", BNODE_TTL)
    _, one = ingest_read(tmp_path / "ws1", [path])
    _, two = ingest_read(tmp_path / "ws2", [path])
    assert len(_bnodes(one)) == 4  # two awards, an address, a street
    assert _bnodes(one) == _bnodes(two)
    assert one == two  # the whole stores agree, ids included


def test_distinct_blank_nodes_stay_distinct(tmp_path):
    _, got = ingest_read(tmp_path / "ws", [write(tmp_path / "b.ttl", BNODE_TTL)])
    labels = sorted(label for label, _ in _bnodes(got).values())
    assert "Nobel Prize in Chemistry" in labels and "Nobel Prize in Physics" in labels
    awards = {t for h, r, t, _ in got["triples"] if h == "http://x.org/Marie" and r == "http://x.org/award"}
    assert len(awards) == 2 and all(a.startswith("_:") for a in awards)
    years = {(e, v) for e, p, v, _, _ in got["attributes"] if p == "http://x.org/year"}
    assert {v for _, v in years} == {"1903", "1911"} and {e for e, _ in years} == awards
    # nested blank nodes: Marie -> address -> street -> literal
    (address,) = {t for h, r, t, _ in got["triples"] if r == "http://x.org/address"}
    (street,) = {t for h, r, t, _ in got["triples"] if h == address and r == "http://x.org/street"}
    assert street.startswith("_:") and street != address
    assert (street, "http://x.org/name_of_street", "Rue Cuvier", "", "") in got["attributes"]


def test_ntriples_blank_node_labels_are_per_source(tmp_path):
    a = write(tmp_path / "a.nt", "_:b1 <http://x.org/p> <http://x.org/x> .\n_:b1 <http://x.org/q> <http://x.org/y> .\n")
    b = write(tmp_path / "b.nt", "_:b1 <http://x.org/p> <http://x.org/z> .\n")
    _, got = ingest_read(tmp_path / "ws", [a, b])
    assert len(_bnodes(got)) == 2  # _:b1 of a.nt (used twice: one node) and _:b1 of b.nt
    heads_a = {h for h, _, t, _ in got["triples"] if t in ("http://x.org/x", "http://x.org/y")}
    heads_b = {h for h, _, t, _ in got["triples"] if t == "http://x.org/z"}
    assert len(heads_a) == 1 and len(heads_b) == 1 and heads_a != heads_b
    # ... and stable: the same file in another workspace gives the same key
    _, again = ingest_read(tmp_path / "ws2", [a])
    assert set(_bnodes(again)) == heads_a


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    """The sample graph ingested once for the read-only checks of this module."""
    root = tmp_path_factory.mktemp("sample")
    results, got = ingest_read(root / "ws", [SAMPLE_TTL])
    return root / "ws", results, got


def test_sample_graph_blank_nodes(sample_store):
    _, _, got = sample_store
    assert sorted(label for label, _ in _bnodes(got).values()) == ["Nobel Prize in Physics 1903",
                                                                   "Nobel Prize in Physics 1921"]
    award_edges = {(h, t) for h, r, t, _ in got["triples"] if r == "http://example.org/kg/award"}
    assert {h for h, _ in award_edges} == {"http://example.org/kg/Marie_Curie", "http://example.org/kg/Albert_Einstein"}
    assert {t for _, t in award_edges} == set(_bnodes(got))


def test_same_content_under_another_name_adds_nothing(tmp_path):
    ws = tmp_path / "ws"
    _, before = ingest_read(ws, [SAMPLE_TTL])
    copy = write(tmp_path / "world_copy.ttl", SAMPLE_TTL.read_bytes())
    _, after = ingest_read(ws, [copy])
    assert graph_of(after) == graph_of(before)


# ---------------------------------------------------------------------------------------------------------
# 5. Attributes
# ---------------------------------------------------------------------------------------------------------
ATTR_TTL = PREFIXES + """\
ex:population rdfs:label "population"@en ; rdfs:comment "Number of inhabitants."@en .
ex:France rdfs:label "France"@en ; ex:population 68000000 ; ex:motto "Liberté, égalité, fraternité"@fr ;
    ex:founded "0843-08-10"^^xsd:date ; ex:code "FR"^^xsd:string ; ex:note "plain" ;
    ex:capital ex:Paris .
ex:Paris rdfs:label "Paris"@en ; ex:population 2100000 .
"""
EXPECTED_ATTR_ROWS = {
    ("http://x.org/France", "http://x.org/population", "68000000", XSD + "integer", ""),
    ("http://x.org/France", "http://x.org/motto", "Liberté, égalité, fraternité", "", "fr"),
    ("http://x.org/France", "http://x.org/founded", "0843-08-10", XSD + "date", ""),
    ("http://x.org/France", "http://x.org/code", "FR", "", ""),  # xsd:string is a plain literal
    ("http://x.org/France", "http://x.org/note", "plain", "", ""),
    ("http://x.org/Paris", "http://x.org/population", "2100000", XSD + "integer", ""),
}


@pytest.mark.parametrize("fmt", ["turtle", "ntriples"])  # rdflib reader and oxigraph reader
def test_literals_are_attributes_not_edges(tmp_path, fmt):
    path = write(tmp_path / "a.ttl", ATTR_TTL)
    if fmt == "ntriples":
        g = rdflib.Graph().parse(path, format="turtle")
        path = tmp_path / "a.nt"
        g.serialize(destination=str(path), format="nt", encoding="utf-8")
    results, got = ingest_read(tmp_path / "ws", [path])
    assert got["attributes"] == EXPECTED_ATTR_ROWS
    assert got["triples"] == {("http://x.org/France", "http://x.org/capital", "http://x.org/Paris", "train")}
    assert set(got["relations"]) == {"http://x.org/capital"}
    # ex:population has a label and a comment but is only a property: not an entity
    assert set(got["entities"]) == {"http://x.org/France", "http://x.org/Paris"}
    assert results[0].counts.attributes == 6 and results[0].counts.entities == 2


def test_attributes_of_a_node_without_edges_make_it_an_entity(tmp_path):
    path = write(tmp_path / "a.ttl", PREFIXES + 'ex:Lonely rdfs:label "Lonely"@en ; ex:age 3 .\nex:a ex:p ex:b .\n')
    _, got = ingest_read(tmp_path / "ws", [path])
    assert got["entities"]["http://x.org/Lonely"] == ("Lonely", None)
    assert ("http://x.org/Lonely", "http://x.org/age", "3", XSD + "integer", "") in got["attributes"]


def test_sample_graph_attributes(sample_store):
    _, _, got = sample_store
    assert len(got["attributes"]) == 51
    preds = {p for _, p, _, _, _ in got["attributes"]}
    assert not preds & set(got["relations"]) and not preds & set(got["entities"])
    assert ("http://example.org/kg/Marie_Curie", "https://schema.org/birthDate", "1867-11-07", XSD + "date", "") \
        in got["attributes"]


def test_attribute_property_described_in_an_earlier_file_is_not_an_entity(tmp_path):
    onto = write(tmp_path / "onto.ttl", PREFIXES + 'ex:population rdfs:label "population"@en .\nex:a ex:p ex:b .\n')
    data = write(tmp_path / "data.ttl", PREFIXES + 'ex:a ex:population 5 .\n')
    _, got = ingest_read(tmp_path / "ws", [onto, data])
    assert "http://x.org/population" not in got["entities"]


def test_relation_described_in_an_earlier_file_keeps_its_label(tmp_path):
    onto = write(tmp_path / "onto.ttl", PREFIXES + 'ex:born_in rdfs:label "was born in"@en .\n')
    data = write(tmp_path / "data.ttl", PREFIXES + 'ex:Ada ex:born_in ex:London .\n')
    _, got = ingest_read(tmp_path / "ws", [onto, data])
    assert got["relations"]["http://x.org/born_in"] == ("was born in", None)
    assert "http://x.org/born_in" not in got["entities"]


# ---------------------------------------------------------------------------------------------------------
# 6. Idempotence
# ---------------------------------------------------------------------------------------------------------
def test_reingesting_the_same_file_adds_nothing(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        first = ingest(store, resolve_sources([SAMPLE_TTL]))
        assert not first[0].skipped and first[0].counts.triples == 304
        before = dump_con(store.con)
        again = ingest(store, resolve_sources([SAMPLE_TTL]))
        assert again[0].skipped
        c = again[0].counts
        assert (c.entities, c.relations, c.triples, c.attributes, c.texts_updated) == (0, 0, 0, 0, 0)
        assert dump_con(store.con) == before


def test_same_file_twice_in_one_command_is_read_once(tmp_path):
    results, got = ingest_read(tmp_path / "ws", [SAMPLE_TTL, SAMPLE_TTL])
    assert [r.skipped for r in results] == [False, True]
    assert got["ingests"] == 1 and len(got["triples"]) == 304


def test_second_file_extends_the_graph(tmp_path):
    ws = tmp_path / "ws"
    one = write(tmp_path / "one.ttl", PREFIXES + 'ex:b rdfs:label "Bee"@en ; ex:p ex:c .\nex:c ex:p ex:d .\n')
    two = write(tmp_path / "two.nt", "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n"
                                     "<http://x.org/c> <http://x.org/p> <http://x.org/d> .\n"
                                     "<http://x.org/d> <http://x.org/q> <http://x.org/e> .\n")
    _, before = ingest_read(ws, [one])
    results, after = ingest_read(ws, [two])
    c = results[0].counts
    assert (c.entities, c.relations, c.triples) == (2, 1, 2)  # a, e; q; a-p-b, d-q-e (c-p-d existed)
    ids, rels = after["entity_ids"], after["relation_ids"]
    assert {k: ids[k] for k in before["entity_ids"]} == before["entity_ids"]  # existing ids kept
    assert {k: rels[k] for k in before["relation_ids"]} == before["relation_ids"]
    new = {k: v for k, v in ids.items() if k not in before["entity_ids"]}
    assert set(new) == {"http://x.org/a", "http://x.org/e"}
    n = len(before["entity_ids"])
    assert sorted(new.values()) == [n, n + 1]  # dense, after the old ones
    assert after["entities"]["http://x.org/b"] == ("Bee", None)  # texts of file one kept
    assert len(after["triples"]) == 4 and after["ingests"] == 2


# ---------------------------------------------------------------------------------------------------------
# 7. Atomicity: a bad file in the middle of a multi-file ingest changes nothing
# ---------------------------------------------------------------------------------------------------------
def _good_and_bad(tmp_path: Path, kind: str) -> list[Path]:
    if kind == "rdf":
        return [
            write(tmp_path / "good1.ttl", PREFIXES + 'ex:g1 rdfs:label "G1"@en ; ex:p ex:g2 ; ex:n 1 .\n'),
            write(tmp_path / "bad.ttl", PREFIXES + 'ex:x ex:p ex:y .\nex:x ex:p .\n'),
            write(tmp_path / "good2.nt", "<http://x.org/g3> <http://x.org/p> <http://x.org/g4> .\n"),
        ]
    return [
        write(tmp_path / "good1.tsv", "g1\tp\tg2\n"),
        write(tmp_path / "bad.tsv", "x\tp\ty\nx\tp\ty\tz\n"),
        write(tmp_path / "good2.tsv", "g3\tp\tg4\n"),
    ]


@pytest.mark.parametrize("kind", ["rdf", "tsv"])
@pytest.mark.parametrize("with_earlier_data", [False, True])
def test_bad_file_in_the_middle_changes_nothing(tmp_path, kind, with_earlier_data):
    ws = Workspace(tmp_path / "ws")
    files = _good_and_bad(tmp_path, kind)
    with Store.open(ws, create=True) as store:
        if with_earlier_data:
            ingest(store, resolve_sources([SAMPLE_TTL]))
        before = dump_con(store.con)
        with pytest.raises(KalmkgError, match="bad"):
            ingest(store, resolve_sources(files))
        assert dump_con(store.con) == before  # same connection, after the rollback
        assert len(before["entities"]) == (144 if with_earlier_data else 0)
    assert dump(ws.root) == before  # and on disk
    # nothing of the good files was recorded: they ingest normally afterwards
    results = ingest_into(ws.root, [files[0], files[2]])
    assert [r.skipped for r in results] == [False, False]
    assert sum(r.counts.triples for r in results) == 2


def test_error_in_the_last_file_after_good_ones_changes_nothing(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "seed.tsv", "s\tp\to\n")])
    before = dump(ws)
    bad = write(tmp_path / "bad.nt", "<http://x.org/a> <http://x.org/p> <http://x.org/b>\n")  # no final dot
    with pytest.raises(KalmkgError, match="bad.nt"):
        ingest_into(ws, [SAMPLE_TTL, tmp_path / "seed.tsv", bad])
    assert dump(ws) == before


def test_missing_path_fails_before_any_work(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "seed.tsv", "s\tp\to\n")])
    before = dump(ws)
    with pytest.raises(KalmkgError, match="no such file"):
        ingest_into(ws, [SAMPLE_TTL, tmp_path / "missing.ttl"])
    assert dump(ws) == before


# ---------------------------------------------------------------------------------------------------------
# 8. Bad input (library level; test_cli.py checks the one-line output and the exit code)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory):
    """One workspace for the failing ingests: each failure leaves it as it was (checked at the end)."""
    root = tmp_path_factory.mktemp("bad") / "ws"
    seed = write(root.parent / "seed.tsv", "s\tp\to\n")
    ingest_into(root, [seed])
    before = dump(root)
    yield root
    assert dump(root) == before


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # rdflib's own TriG parser
@pytest.mark.parametrize("name, content, fmt, fragments", [
    ("bad.ttl", PREFIXES + "ex:a ex:p ex:b .\nex:a ex:p .\n", None, ["bad.ttl", "line 9", "syntax error",
                                                                      "not a valid RDF object"]),
    ("bad.nt", "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n<http://x.org/a> <http://x.org/p> .\n",
     None, ["bad.nt", "line 2", "syntax error"]),
    ("bad.nq", "<http://x.org/a> <http://x.org/p> \"x .\n", None, ["bad.nq", "line 1"]),
    ("bad.trig", PREFIXES + "ex:g { ex:a ex:p ex:b .\n", None, ["bad.trig", "syntax error"]),
    ("bad.rdf", '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n<oops>\n</rdf:RDF>\n',
     None, ["bad.rdf", "syntax error", ":3"]),
    ("bad.jsonld", '{"@id": ', None, ["bad.jsonld", "syntax error", "line 1"]),
    ("latin1.ttl", PREFIXES.encode() + b'ex:a ex:p "caf\xe9" .\n', None, ["latin1.ttl:8", "not valid UTF-8"]),
    ("latin1.tsv", b"a\tr\tb\nc\tr\t\xe9t\xe9\n", None, ["latin1.tsv:2", "not valid UTF-8"]),
    ("empty.tsv", "", None, ["empty.tsv", "empty"]),
    ("four.tsv", "a\tr\tb\nc\tr\td\te\nf\tr\tg\n", None, ["four.tsv:2", "3", "found 4"]),
    ("two.tsv", "a\tr\tb\nc\tr\td\nf\tr\n", None, ["two.tsv:3", "found 2"]),
    ("hole.tsv", "a\tr\tb\nc\t\td\n", None, ["hole.tsv:2", "empty"]),
    ("bad.csv", "a,r,b\nc,r\n", None, ["bad.csv:2", "found 2"]),
    ("data.foo", "a\tr\tb\n", None, ["data.foo", "--format", "turtle", "tsv"]),
    ("noext", "a\tr\tb\n", None, ["noext", "--format"]),
    ("data.tsv", "a\tr\tb\n", "yaml", ["unknown format 'yaml'", "turtle", "ntriples", "jsonld", "csv"]),
])
def test_bad_input_raises_a_clear_error(shared_ws, tmp_path, name, content, fmt, fragments):
    path = write(tmp_path / name, content)
    with pytest.raises(KalmkgError) as info:
        ingest_into(shared_ws, [path], fmt=fmt)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_non_utf8_after_the_first_read_block_names_the_right_line(shared_ws, tmp_path):
    line = "head_entity\trelation\ttail_entity\n"
    n = (5 << 20) // len(line)  # past the 4 MiB block of the UTF-8 check
    path = write(tmp_path / "big.tsv", (line * n).encode() + b"x\tr\t\xff\n")
    with pytest.raises(KalmkgError, match=rf"big\.tsv:{n + 1}: not valid UTF-8"):
        ingest_into(shared_ws, [path])


def test_utf8_character_across_a_read_block_is_fine(tmp_path):
    block = 1 << 22  # the UTF-8 check reads 4 MiB at a time
    comment = "# " + "x" * (block - 3)  # 'é' (2 bytes) starts at byte block - 1
    path = write(tmp_path / "edge.nt", comment + "é\n<http://x.org/caf%C3%A9> <http://x.org/p> <http://x.org/b> .\n")
    assert path.read_bytes()[block - 1:block + 1] == "é".encode()
    _, got = ingest_read(tmp_path / "ws", [path])
    assert got["entities"]["http://x.org/caf%C3%A9"] == ("café", None)


# ---------------------------------------------------------------------------------------------------------
# 13. TSV / CSV
# ---------------------------------------------------------------------------------------------------------
def test_csv_with_header_and_quoted_values(tmp_path):
    path = write(tmp_path / "capitals.csv",
                 'head,relation,tail\n"Washington, D.C.",capital_of,"United States"\nParis,capital_of,France\n')
    results, got = ingest_read(tmp_path / "ws", [path])
    assert results[0].format == "csv"
    assert got["triples"] == {("Washington, D.C.", "capital_of", "United States", "train"),
                              ("Paris", "capital_of", "France", "train")}
    assert "head" not in got["entities"] and "relation" not in got["relations"]


@pytest.mark.parametrize("header", ["head\trelation\ttail", "subject\tpredicate\tobject", "H\tR\tT"])
def test_tsv_header_line_is_skipped(tmp_path, header):
    _, got = ingest_read(tmp_path / "ws", [write(tmp_path / "t.tsv", f"{header}\na\tr\tb\n")])
    assert got["triples"] == {("a", "r", "b", "train")}


def test_csv_with_quoted_header(tmp_path):
    path = write(tmp_path / "q.csv", '"head","relation","tail"\n"Paris","capital_of","France"\n')
    _, got = ingest_read(tmp_path / "ws", [path])
    assert got["triples"] == {("Paris", "capital_of", "France", "train")}


def test_tsv_keeps_quotes_and_handles_crlf(tmp_path):
    path = write(tmp_path / "t.tsv", 'The "Big" Apple\tnickname_of\tNew York\r\nb\tr\tc\r\n')
    _, got = ingest_read(tmp_path / "ws", [path])
    assert got["triples"] == {('The "Big" Apple', "nickname_of", "New York", "train"), ("b", "r", "c", "train")}


def test_split_option_applies_to_single_tsv_files(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "t.tsv", "a\tr\tb\nb\tr\tc\n")], split="test")
    ingest_into(ws, [write(tmp_path / "v.csv", "c,r,d\n")], split="valid")
    _, got = ingest_read(ws, [write(tmp_path / "more.txt", "d\tr\ta\n")])
    assert got["triples"] == {("a", "r", "b", "test"), ("b", "r", "c", "test"), ("c", "r", "d", "valid"),
                              ("d", "r", "a", "train")}


def test_folder_keeps_its_splits_and_overlaps_go_to_train(tmp_path):
    folder = tmp_path / "bench"
    write(folder / "train.tsv", "a\tr\tb\nb\tr\tc\nc\tr\ta\n")
    write(folder / "dev.tsv", "a\tr\tc\nb\tr\tc\n")  # b-r-c is also in train
    write(folder / "test.tsv", "b\tr\ta\na\tr\tb\nc\tr\tb\n")  # a-r-b is also in train
    write(folder / "entity2text.txt", "a\tAlpha\nb\tBravo\nc\tCharlie\n")
    write(folder / "relation2text.txt", "r\trelated to\n")
    write(folder / "README.md", "not a graph file\n")
    # --split does not apply to a folder: its files say where each triple goes
    results, got = ingest_read(tmp_path / "ws", [folder], split="test")
    assert results[0].format == "tsv-folder"
    assert got["triples"] == {("a", "r", "b", "train"), ("b", "r", "c", "train"), ("c", "r", "a", "train"),
                              ("a", "r", "c", "valid"), ("b", "r", "a", "test"), ("c", "r", "b", "test")}
    assert got["entities"] == {"a": ("Alpha", None), "b": ("Bravo", None), "c": ("Charlie", None)}
    assert got["relations"] == {"r": ("related to", None)}


def test_triple_in_valid_and_test_goes_to_valid(tmp_path):
    folder = tmp_path / "bench"
    write(folder / "train.tsv", "a\tr\tb\n")
    write(folder / "dev.tsv", "b\tr\ta\n")
    write(folder / "test.tsv", "b\tr\ta\n")
    _, got = ingest_read(tmp_path / "ws", [folder])
    assert got["triples"] == {("a", "r", "b", "train"), ("b", "r", "a", "valid")}


def test_folder_with_valid_tsv_and_triples_tsv(tmp_path):
    folder = tmp_path / "ours"
    write(folder / "triples.tsv", "a\tr\tb\nb\tr\tc\n")
    write(folder / "valid.tsv", "c\tr\ta\n")
    _, got = ingest_read(tmp_path / "ws", [folder])
    assert got["splits"] == {"train": 2, "valid": 1}


def test_folder_without_triples_is_an_error(tmp_path):
    write(tmp_path / "texts" / "entity2text.txt", "a\tAlpha\n")
    with pytest.raises(KalmkgError, match="train.tsv"):
        ingest_into(tmp_path / "ws", [tmp_path / "texts"])


def test_triple_in_test_then_in_train_ends_up_in_train(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "test_part.tsv", "a\tr\tb\n")], split="test")
    _, got = ingest_read(ws, [write(tmp_path / "train_part.tsv", "a\tr\tb\nb\tr\tc\n")])
    assert got["triples"] == {("a", "r", "b", "train"), ("b", "r", "c", "train")}


def test_entity_and_relation_sharing_an_id_keep_their_own_texts(tmp_path):
    folder = tmp_path / "f"
    write(folder / "triples.tsv", "x\tp\ty\np\tq\tx\n")
    write(folder / "entities.tsv", "p\tEntity P\nx\tEx\n")
    write(folder / "relations.tsv", "p\tRelation P\nq\tQu\n")
    _, got = ingest_read(tmp_path / "ws", [folder])
    assert got["entities"]["p"] == ("Entity P", None)
    assert got["relations"]["p"] == ("Relation P", None)


def test_entity_text_name_comma_description_is_split_only_when_nearly_all_lines_have_it(tmp_path):
    kgbert = tmp_path / "kgbert"
    write(kgbert / "train.tsv", "s1\tr\ts2\ns2\tr\ts3\n")
    write(kgbert / "entity2text.txt", "s1\tstool, solid excretory product\ns2\tchair, a seat\n"
                                      "s3\tsaxony, an area in Germany, around the Elbe\n")
    labels = tmp_path / "labels"
    write(labels / "train.tsv", "dc\tcapital_of\tus\nparis\tcapital_of\tfr\nus\tr\tfr\n")
    write(labels / "entity2text.txt", "dc\tWashington, D.C.\nparis\tParis\nfr\tFrance\nus\tUnited States\n")
    _, one = ingest_read(tmp_path / "ws1", [kgbert])
    assert one["entities"]["s1"] == ("stool", "solid excretory product")
    assert one["entities"]["s3"] == ("saxony", "an area in Germany, around the Elbe")
    _, two = ingest_read(tmp_path / "ws2", [labels])
    assert two["entities"]["dc"] == ("Washington, D.C.", None)
    assert two["entities"]["paris"] == ("Paris", None)


def test_entity_text_file_alone_updates_labels_of_an_existing_graph(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [write(tmp_path / "triples.tsv", "Ada_Lovelace\tborn_in\tLondon\n")])
    results, got = ingest_read(ws, [write(tmp_path / "entities.tsv",
                                          "Ada_Lovelace\tAda Lovelace\tEnglish mathematician.\n"
                                          "London\tLondon\tCapital of England.\n")])
    c = results[0].counts
    assert (c.triples, c.entities, c.texts_updated) == (0, 0, 2)
    assert got["entities"] == {"Ada_Lovelace": ("Ada Lovelace", "English mathematician."),
                               "London": ("London", "Capital of England.")}


def test_text_file_with_wrong_columns_names_the_line(tmp_path):
    folder = tmp_path / "f"
    write(folder / "train.tsv", "a\tr\tb\n")
    write(folder / "entity2text.txt", "a\tAlpha\nb\tBravo\tdesc\textra\n")
    with pytest.raises(KalmkgError, match=r"entity2text\.txt:2: expected"):
        ingest_into(tmp_path / "ws", [folder])


def test_reingesting_a_folder_is_skipped_until_a_file_changes(tmp_path):
    folder = tmp_path / "f"
    write(folder / "train.tsv", "a\tr\tb\n")
    write(folder / "test.tsv", "b\tr\ta\n")
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([folder]))
        before = dump_con(store.con)
        assert ingest(store, resolve_sources([folder]))[0].skipped
        assert dump_con(store.con) == before
        # a changed file in the folder is new content: it is ingested and extends the graph
        write(folder / "test.tsv", "b\tr\ta\nb\tr\tc\n")
        result = ingest(store, resolve_sources([folder]))[0]
        assert not result.skipped and result.counts.triples == 1


# ---------------------------------------------------------------------------------------------------------
# 12. Benchmark folders (../shared/datasets)
# ---------------------------------------------------------------------------------------------------------
def _dataset(name: str) -> Path:
    path = DATASETS / name
    if not (path / "train.tsv").is_file():
        pytest.skip(f"benchmark data not found: {path} (../shared/datasets relative to the project root)")
    return path


@pytest.mark.slow
def test_wn18rr_counts(tmp_path):
    folder = _dataset("WN18RR")
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        results = ingest(store, resolve_sources([folder]))
        c = results[0].counts
        assert (c.entities, c.relations, c.triples) == (40943, 11, 86835 + 3034 + 3134)
        q = lambda sql: store.con.execute(sql).fetchall()  # noqa: E731
        assert dict(q("SELECT split, count(*) FROM triples GROUP BY split")) == \
            {"train": 86835, "valid": 3034, "test": 3134}
        assert q("SELECT count(*), count(DISTINCT key), max(id) FROM entities") == [(40943, 40943, 40942)]
        # "name, definition" entity text is split into a label and a description
        assert q("SELECT label, description FROM entities WHERE key = '14854262'") == \
            [("stool", "solid excretory product evacuated from the bowels")]
        assert q("SELECT count(*) FROM entities WHERE description IS NULL") == [(0,)]
        assert q("SELECT label FROM relations WHERE key = '_hypernym'") == [("hypernym",)]
        assert ingest(store, resolve_sources([folder]))[0].skipped


@pytest.mark.slow
def test_umls_counts_and_long_descriptions(tmp_path):
    folder = _dataset("UMLS")
    results, got = ingest_read(tmp_path / "ws", [folder])
    c = results[0].counts
    assert (c.entities, c.relations, c.triples) == (135, 46, 5216 + 652 + 661)
    assert got["splits"] == {"train": 5216, "valid": 652, "test": 661}
    label, desc = got["entities"]["virus"]
    assert label == "virus" and desc.startswith("A virus is a small infectious agent")
    label, desc = got["entities"]["idea_or_concept"]
    assert label == "idea or concept" and desc.startswith("In philosophy, ideas")
    long_texts = dict(line.split("\t", 1) for line in
                      (folder / "entity2textlong.txt").read_text(encoding="utf-8").splitlines() if line.strip())
    assert {k: got["entities"][k][1] for k in long_texts} == {k: v.strip() for k, v in long_texts.items()}


# ---------------------------------------------------------------------------------------------------------
# 15. Compressed files and the streaming Turtle/TriG reader
# ---------------------------------------------------------------------------------------------------------
def _compress(path: Path, kind: str) -> Path:
    import bz2
    import gzip
    import lzma

    out = path.with_name(path.name + "." + kind)
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind]
    with opener(out, "wb") as fh:
        fh.write(path.read_bytes())
    return out


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz"])
def test_a_compressed_rdf_file_is_the_same_graph_and_the_same_source(tmp_path, kind):
    packed = _compress(write(tmp_path / "world.ttl", SAMPLE_TTL.read_bytes()), kind)
    results, got = ingest_read(tmp_path / "ws", [packed])
    assert results[0].format == "turtle" and not results[0].skipped
    _, plain = ingest_read(tmp_path / "ws-plain", [SAMPLE_TTL])
    assert graph_of(got) == graph_of(plain)
    # the fingerprint is the content's: the uncompressed file adds nothing to the same store
    again, after = ingest_read(tmp_path / "ws", [SAMPLE_TTL])
    assert again[0].skipped and graph_of(after) == graph_of(got)


def _count_decompressions(monkeypatch) -> list:
    from kalmkg.ingestion import sources

    opened = []
    for kind, opener in list(sources._OPENERS.items()):
        monkeypatch.setitem(sources._OPENERS, kind, lambda f, opener=opener, kind=kind: opened.append(kind) or opener(f))
    return opened


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_a_compressed_rdf_file_is_decompressed_once_and_known_again_without_decompressing(tmp_path, monkeypatch,
                                                                                          kind):
    packed = _compress(write(tmp_path / "world.ttl", SAMPLE_TTL.read_bytes()), kind)
    opened = _count_decompressions(monkeypatch)
    results, got = ingest_read(tmp_path / "ws", [packed])
    assert opened == [kind] and not results[0].skipped  # hashed and checked as it was parsed
    again, after = ingest_read(tmp_path / "ws", [packed, tmp_path / "world.ttl"])
    assert opened == [kind] and again[0].skipped and again[1].skipped and after == got
    # the store records the content's fingerprint (as for the plain file) and the compressed file's
    (content,), = query(tmp_path / "ws", "SELECT sha256 FROM ingests")
    assert query(tmp_path / "ws", "SELECT sha256 FROM source_files") == [(content,)]
    plain, _ = ingest_read(tmp_path / "ws-plain", [tmp_path / "world.ttl"])
    assert query(tmp_path / "ws-plain", "SELECT sha256 FROM ingests") == [(content,)]
    assert query(tmp_path / "ws-plain", "SELECT count(*) FROM source_files") == [(0,)]


def test_another_compression_of_an_ingested_content_adds_nothing_and_is_known_after(tmp_path, monkeypatch):
    plain = write(tmp_path / "world.ttl", SAMPLE_TTL.read_bytes())
    gz, xz = _compress(plain, "gz"), _compress(plain, "xz")
    results, got = ingest_read(tmp_path / "ws", [plain, gz])  # one command: the first of one content counts
    assert [r.skipped for r in results] == [False, True] and results[1].rows_read == 0
    opened = _count_decompressions(monkeypatch)
    again, after = ingest_read(tmp_path / "ws", [xz, gz])  # found the same once parsed (xz), dropped
    assert [r.skipped for r in again] == [True, True] and after == got and opened == ["xz"]
    assert ingest_read(tmp_path / "ws", [xz, gz])[0][0].skipped and opened == ["xz"]  # both known by their files


def test_blank_nodes_of_compressed_files_keep_their_contents_keys(tmp_path):
    one = "_:b1 <http://x.org/p> <http://x.org/a> .\n_:b1 <http://x.org/v> \"7\" .\n_:b1 <http://www.w3.org/2000/01/rdf-schema#label> \"B\" .\n"
    two = "_:b1 <http://x.org/p> <http://x.org/c> .\n"
    files = [_compress(write(tmp_path / "one.nt", one), "gz"), _compress(write(tmp_path / "two.nt", two), "bz2")]
    _, packed = ingest_read(tmp_path / "ws", files)  # one command, the same label in both files
    _, plain = ingest_read(tmp_path / "ws-plain", [tmp_path / "one.nt", tmp_path / "two.nt"])
    assert graph_of(packed) == graph_of(plain) and packed["attributes"] == plain["attributes"]
    heads = {h for h, _, _, _ in packed["triples"]}
    assert len(heads) == 2 and all(h.startswith("_:") and "~" not in h for h in heads)  # two nodes, renamed


def test_non_utf8_in_a_compressed_file_names_the_line(shared_ws, tmp_path):
    line = "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n"
    n = (3 << 20) // len(line)  # past the first pieces the parser reads
    packed = _compress(write(tmp_path / "big.nt", (line * n).encode() + b'<http://x.org/a> <http://x.org/p> "\xff" .\n'),
                       "gz")
    with pytest.raises(KalmkgError, match=rf"big\.nt\.gz:{n + 1}: not valid UTF-8"):
        ingest_into(shared_ws, [packed])


def test_an_older_store_gains_the_compressed_files_fingerprint(tmp_path):
    from kalmkg.store import SCHEMA_VERSION

    ws = tmp_path / "ws"
    ingest_into(ws, [SAMPLE_TTL])
    with Store.open(Workspace(ws), write=True) as store:  # as kalmkg before the column wrote it
        store.con.execute("DROP TABLE source_files")
        store.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION - 1)])
    results = ingest_into(ws, [SAMPLE_TTL, _compress(write(tmp_path / "w.ttl", SAMPLE_TTL.read_bytes()), "gz")])
    assert all(r.skipped for r in results)  # what it had ingested is still known, compressed or not
    assert query(ws, "SELECT count(*) FROM ingests") == [(1,)]
    assert query(ws, "SELECT count(*) FROM source_files") == [(1,)]  # the compressed copy is now known as such


@pytest.mark.parametrize("kind", ["gz", "xz"])
def test_compressed_ntriples_tsv_and_folders_stream_too(tmp_path, kind):
    nt = _compress(write(tmp_path / "g.nt", "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n"), kind)
    _, got = ingest_read(tmp_path / "ws-nt", [nt])
    assert ("http://x.org/a", "http://x.org/p", "http://x.org/b", "train") in got["triples"]
    tsv = _compress(write(tmp_path / "t.tsv", "head\trelation\ttail\nAda\tborn_in\tLondon\n"), kind)
    _, got = ingest_read(tmp_path / "ws-tsv", [tsv])
    assert got["triples"] == {("Ada", "born_in", "London", "train")}  # the header was seen through the compression
    folder = tmp_path / "bench"
    folder.mkdir()
    _compress(write(folder / "train.tsv", "a\tr\tb\n"), kind)
    _compress(write(folder / "entity2text.txt", "a\tAda\nb\tBob\n"), kind)
    _, got = ingest_read(tmp_path / "ws-folder", [folder])
    assert got["triples"] == {("a", "r", "b", "train")} and got["entities"]["a"] == ("Ada", None)


def test_a_bad_line_in_a_compressed_tsv_is_named(shared_ws, tmp_path):
    bad = _compress(write(tmp_path / "bad.tsv", "a\tr\tb\nc\tr\n"), "gz")
    with pytest.raises(KalmkgError, match=r"bad\.tsv\.gz:2: expected 3 tab-separated columns"):
        ingest_into(shared_ws, [bad])


@pytest.mark.parametrize("name, content, fragment", [
    ("broken.ttl.gz", b"\x1f\x8b\x08\x00 this is not gzip data", "cannot decompress"),
    ("broken.nt.xz", b"not xz at all", "cannot decompress"),
    ("graph.ttl.zst", b"whatever", ".zst files are not read"),
    ("graph.tsv.zip", b"whatever", "compress it as .gz, .bz2 or .xz"),
])
def test_bad_compressed_files_get_one_line(shared_ws, tmp_path, name, content, fragment):
    with pytest.raises(KalmkgError) as info:
        ingest_into(shared_ws, [write(tmp_path / name, content)])
    assert fragment in str(info.value) and name in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_gzip_file_is_refused_and_stores_nothing(shared_ws, tmp_path):
    packed = _compress(write(tmp_path / "world.ttl", SAMPLE_TTL.read_bytes()), "gz")
    cut = write(tmp_path / "cut.ttl.gz", packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(KalmkgError, match=r"cut\.ttl\.gz: cannot decompress"):
        ingest_into(shared_ws, [cut])


def test_progress_counts_the_bytes_on_disk_of_a_compressed_file(tmp_path):
    from kalmkg.ingestion import IngestProgress

    class Counter(IngestProgress):
        def __init__(self):
            self.bytes: dict[str, int] = {}
            self.stage = ""

        def start(self, source, stage):
            self.stage = stage
            self.total = source.size

        def advance(self, nbytes=0, rows=0):
            self.bytes[self.stage] = self.bytes.get(self.stage, 0) + nbytes
            self.threads.add(threading.current_thread())

    packed = _compress(write(tmp_path / "world.ttl", SAMPLE_TTL.read_bytes()), "gz")
    counter = Counter()
    counter.threads = set()
    with Store.open(Workspace(tmp_path / "ws"), create=True) as store:
        ingest(store, resolve_sources([packed]), progress=counter)
    size = packed.stat().st_size
    assert counter.bytes["checking"] == size and counter.bytes["reading"] == size and counter.total == size
    # decompression runs in a thread ahead of the parser, but the progress bar hears only from the caller's
    assert counter.threads == {threading.main_thread()}


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_a_compressed_file_reads_ahead_in_a_thread_that_ends_with_the_reader(tmp_path, kind):
    from kalmkg.ingestion.sources import ContentCheck, open_source

    content = b"".join(b"<http://x.org/e%d> <http://x.org/p> <http://x.org/o> .\n" % i for i in range(60_000))
    packed = _compress(write(tmp_path / "big.nt", content), kind)
    with open_source(packed, kind) as reader:
        assert [t for t in threading.enumerate() if t.name == "kalmkg-read-ahead"]  # decompressing ahead
        assert reader.read() == content  # every byte, in order, across the thread's chunks
    check = ContentCheck(packed)
    reader = open_source(packed, kind, check=check)
    assert reader.read(10) == content[:10]  # a parser that stops early (a syntax error) closes its reader
    reader.close()
    assert not [t for t in threading.enumerate() if t.name == "kalmkg-read-ahead"]


def test_a_compressed_tsv_line_of_several_mib_reads_as_the_plain_one(tmp_path):
    """pyarrow takes each read as a block: a read must fill its buffer, not stop at a chunk's end."""
    long = "x" * (3 << 20)
    content = f"a\tr\tb\nc\tr\t{long}\nd\tr\te\n"
    _, got = ingest_read(tmp_path / "ws", [_compress(write(tmp_path / "t.tsv", content), "gz")])
    assert got["triples"] == {("a", "r", "b", "train"), ("c", "r", long, "train"), ("d", "r", "e", "train")}


def test_a_compressed_tsv_read_stopped_early_lets_the_process_end(tmp_path):
    """pyarrow reads in a thread of its own; closing the stream must wake a read waiting on the chunks."""
    import gzip
    import subprocess
    import sys

    path = tmp_path / "big.tsv.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write("".join(f"e{i}\tr\te{i + 1}\n" for i in range(3_000_000)).encode())
    code = ("import sys; from pathlib import Path; from kalmkg.ingestion.delimited import read_triples; "
            "from kalmkg.ingestion.sources import SourceFile; "
            "g = read_triples(SourceFile(Path(sys.argv[1]), 'triples', 'tsv', compression='gz')); "
            "next(g); g.close(); print('closed')")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr


def test_a_parse_error_early_in_a_large_compressed_file_stops_its_reading_thread(shared_ws, tmp_path):
    line = "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n"
    packed = _compress(write(tmp_path / "bad.nt", "<http://x.org/a> oops .\n" + line * 100_000), "bz2")
    with pytest.raises(KalmkgError, match=r"bad\.nt\.bz2: syntax error"):
        ingest_into(shared_ws, [packed])
    assert not [t for t in threading.enumerate() if t.name == "kalmkg-read-ahead"]


@pytest.mark.parametrize("name, content", [
    ("space_iri.ttl", "<http://a/ space> <http://a/p> <http://a/o> ."),
    ("bad_escape.ttl", "<http://a/s> <http://a/p> \"\\u00ZZ\" ."),
    ("bad_keyword.ttl", "@prefixx ex: <http://a/> .\nex:s ex:p ex:o ."),
    ("n3_extra.ttl", "@prefix ex: <http://a/> .\n{ ex:s ex:p ex:o } => { ex:s ex:q ex:o } ."),
    ("bad_graph.trig", "@prefix ex: <http://a/> .\nex:g { ex:s ex:p ex:o . } }"),
])
def test_invalid_turtle_and_trig_are_refused_not_stored(shared_ws, tmp_path, name, content):
    """rdflib accepted and stored these; oxigraph implements the W3C grammars strictly."""
    with pytest.raises(KalmkgError, match=rf"{name}: syntax error: line \d+"):
        ingest_into(shared_ws, [write(tmp_path / name, content)])


def test_relative_iris_resolve_against_the_file(tmp_path):
    path = write(tmp_path / "data" / "rel.ttl", "<a> <p> <b> .\n<#c> <p> <../d> .\n")
    _, got = ingest_read(tmp_path / "ws", [path])
    base = path.resolve().as_uri()
    folder = base.rsplit("/", 1)[0]
    assert (f"{folder}/a", f"{folder}/p", f"{folder}/b", "train") in got["triples"]
    assert (f"{base}#c", f"{folder}/p", f"{folder.rsplit('/', 1)[0]}/d", "train") in got["triples"]


def test_turtle_blank_nodes_are_numbered_in_the_order_they_appear(tmp_path):
    """The streaming parser invents a random id for every `[ ... ]`: kalmkg numbers them instead, so the
    same file gives the same keys everywhere (and N-Triples keeps its own labels, see above)."""
    _, got = ingest_read(tmp_path / "ws", [write(tmp_path / "b.ttl", BNODE_TTL)])
    tags = {k.split(":")[1] for k in _bnodes(got)}
    assert len(tags) == 1
    (tag,) = tags
    by_label = {label: key for key, (label, _) in _bnodes(got).items()}
    assert by_label["Nobel Prize in Physics"] == f"_:{tag}:n1" and by_label["Nobel Prize in Chemistry"] == f"_:{tag}:n2"


def test_relative_iris_of_a_compressed_file_resolve_as_the_uncompressed_ones(tmp_path):
    plain = write(tmp_path / "rel.ttl", "<a> <p> <#b> .\n")
    _, one = ingest_read(tmp_path / "ws1", [plain])
    _, two = ingest_read(tmp_path / "ws2", [_compress(plain, "gz")])
    assert one["triples"] == two["triples"]


def test_an_oserror_of_a_plain_file_is_not_called_a_decompression_error(tmp_path, monkeypatch):
    import kalmkg.ingestion.rdf as rdf

    def unreachable(self, *a, **k):
        raise OSError("remote context unreachable")

    monkeypatch.setattr(rdflib.Graph, "parse", unreachable)
    path = write(tmp_path / "x.jsonld", '{"@id": "http://x.org/a", "http://x.org/p": {"@id": "http://x.org/b"}}')
    with pytest.raises(KalmkgError) as info:
        ingest_into(tmp_path / "ws", [path])
    assert "cannot decompress" not in str(info.value) and "x.jsonld" in str(info.value)
    assert rdf.base_iri(Path("/d/dump.ttl.gz"), "gz") == "file:///d/dump.ttl"


@pytest.mark.parametrize("name, content", [
    ("empty.ttl", ""), ("blank.nt", "\n  \n\t\n"), ("prefixes_only.ttl", PREFIXES), ("base_only.trig", "@base <http://x.org/> ."),
    ("comment.nq", "# nothing here\n"),
])
def test_valid_rdf_without_triples_ingests_nothing_and_is_no_error(shared_ws, tmp_path, name, content):
    """The W3C suites' positive tests include such files: valid, empty graphs (issue 14)."""
    (result,) = ingest_into(shared_ws, [write(tmp_path / name, content)])
    assert result.empty and not result.skipped and result.counts.triples == 0


def test_the_cli_warns_about_rdf_without_triples_and_exits_0(tmp_path):
    from helpers_graph import run_kalmkg

    out = run_kalmkg("-w", str(tmp_path / "ws"), "ingest", write(tmp_path / "p.ttl", PREFIXES), "--json", cwd=tmp_path)
    assert out.returncode == 0 and "valid turtle without a single triple; nothing ingested" in out.stderr
    assert json.loads(out.stdout)[0]["empty"] is True


def test_a_percent_escape_that_is_no_utf8_keeps_its_local_name_as_written(tmp_path):
    """`:\\%AA` is a valid Turtle local name; its escape decodes to no UTF-8 (used to crash the merge)."""
    path = write(tmp_path / "esc.ttl", "@prefix : <http://a.example/> .\n:s :p :\\@\\_\\%AA .\n")
    _, got = ingest_read(tmp_path / "ws", [path])
    assert got["entities"]["http://a.example/@_%AA"] == ("@ %AA", None)


def test_a_literal_not_of_its_datatype_is_kept_as_written_without_rdflibs_traceback(tmp_path, caplog):
    """Valid RDF/XML ("flargh"^^xsd:integer): rdflib logs a traceback for it; kalmkg keeps the lexical form."""
    rdf = write(tmp_path / "d.rdf", '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
                'xmlns:ex="http://x.org/"><rdf:Description rdf:about="http://x.org/a"><ex:n '
                'rdf:datatype="http://www.w3.org/2001/XMLSchema#integer">flargh</ex:n></rdf:Description></rdf:RDF>')
    _, got = ingest_read(tmp_path / "ws", [rdf])
    assert ("http://x.org/a", "http://x.org/n", "flargh", XSD + "integer", "") in got["attributes"]
    assert not [r for r in caplog.records if r.name.startswith("rdflib")]  # its log would print a traceback
