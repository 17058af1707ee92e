"""`kalmkg dump`: the graph back out of the store, as N-Triples (which `kalmkg ingest` reads back to the
same graph) or as Parquet tables (keys, labels, splits, attributes: everything the store holds about it).

N-Triples are written by pyoxigraph's serializer, which escapes IRIs and literals as the grammar wants.
A key that is no IRI (a TSV id such as `/m/027rn` or `00001740`) becomes `urn:kalmkg:key:<the key,
percent-encoded>`; blank nodes stay blank nodes. Splits are not a part of RDF: Parquet keeps them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import BinaryIO

from kalmkg.store import Store

FORMATS = ("nt", "parquet")
KEY_PREFIX = "urn:kalmkg:key:"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
XSD_STRING = "http://www.w3.org/2001/XMLSchema#string"
RDF_LANG_STRING = "http://www.w3.org/1999/02/22-rdf-syntax-ns#langString"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BATCH = 65_536

# Parquet tables: name -> the query that gives it, keys in place of the store's dense ids
PARQUET_TABLES = {
    "triples": """SELECT h.key AS head, r.key AS relation, t.key AS tail, x.split FROM triples x
                  JOIN entities h ON h.id = x.head JOIN relations r ON r.id = x.relation
                  JOIN entities t ON t.id = x.tail ORDER BY x.head, x.relation, x.tail""",
    "entities": """SELECT key, label, description, label_lang, description_lang, label_lang IS NULL AS label_derived
                   FROM entities ORDER BY id""",
    "relations": """SELECT key, label, description, label_lang, description_lang, label_lang IS NULL AS label_derived
                    FROM relations ORDER BY id""",
    "attributes": """SELECT e.key AS entity, a.predicate, a.value, a.datatype, a.lang FROM attributes a
                     JOIN entities e ON e.id = a.entity ORDER BY a.entity, a.predicate, a.value""",
}


def dump_parquet(store: Store, folder: Path) -> dict[str, int]:
    """One Parquet file per table (PARQUET_TABLES) into `folder`; rows written per table. DuckDB writes
    them as it reads, in a memory bounded by the store's budget, not by the graph."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, sql in PARQUET_TABLES.items():
        target = str(folder / f"{name}.parquet").replace("'", "''")
        rows = store.con.execute(f"COPY ({sql}) TO '{target}' (FORMAT parquet, COMPRESSION zstd)").fetchone()
        counts[name] = int(rows[0])
    return counts


def dump_ntriples(store: Store, out: BinaryIO) -> int:
    """Every triple, then the labels and descriptions that were given (not those made from a key),
    then the attributes, as N-Triples into `out`; the number of lines written."""
    import pyoxigraph as ox

    written = 0
    for batch in _term_batches(store, ox):
        ox.serialize(batch, out, ox.RdfFormat.N_TRIPLES)
        written += len(batch)
    return written


def _term_batches(store: Store, ox):
    node = functools.partial(_term, ox)
    label, comment = ox.NamedNode(RDFS + "label"), ox.NamedNode(RDFS + "comment")

    def literal(value: str, lang: str | None, datatype: str | None = None):
        if lang:
            return ox.Literal(value, language=lang)
        if datatype and datatype not in (XSD_STRING, RDF_LANG_STRING):
            return ox.Literal(value, datatype=ox.NamedNode(datatype))
        return ox.Literal(value)

    queries = (
        ("""SELECT h.key, r.key, t.key FROM triples x JOIN entities h ON h.id = x.head
            JOIN relations r ON r.id = x.relation JOIN entities t ON t.id = x.tail
            ORDER BY x.head, x.relation, x.tail""",
         lambda h, r, t: ox.Triple(node(h), node(r, relation=True), node(t))),
        ("SELECT key, label, label_lang FROM entities WHERE label_lang IS NOT NULL ORDER BY id",
         lambda k, v, lang: ox.Triple(node(k), label, literal(v, lang))),
        ("SELECT key, description, description_lang FROM entities WHERE description IS NOT NULL ORDER BY id",
         lambda k, v, lang: ox.Triple(node(k), comment, literal(v, lang))),
        ("SELECT key, label, label_lang FROM relations WHERE label_lang IS NOT NULL ORDER BY id",
         lambda k, v, lang: ox.Triple(node(k, relation=True), label, literal(v, lang))),
        ("SELECT key, description, description_lang FROM relations WHERE description IS NOT NULL ORDER BY id",
         lambda k, v, lang: ox.Triple(node(k, relation=True), comment, literal(v, lang))),
        ("""SELECT e.key, a.predicate, a.value, a.lang, a.datatype FROM attributes a JOIN entities e ON e.id = a.entity
            ORDER BY a.entity, a.predicate, a.value""",
         lambda k, p, v, lang, dt: ox.Triple(node(k), node(p, relation=True), literal(v, lang, dt))),
    )
    for sql, make in queries:
        cursor = store.con.execute(sql)
        while rows := cursor.fetchmany(_BATCH):
            yield [make(*row) for row in rows]


def _term(ox, key: str, relation: bool = False):
    """A store key as an RDF term: the IRI it is, a blank node, or an IRI minted from it."""
    if key.startswith("_:") and not relation:
        return ox.BlankNode(re.sub(r"[^A-Za-z0-9_]", "_", key[2:]) or "b")
    if _SCHEME.match(key):
        try:
            return ox.NamedNode(key)
        except ValueError:
            pass
    from urllib.parse import quote

    return ox.NamedNode(KEY_PREFIX + quote(key, safe=""))
