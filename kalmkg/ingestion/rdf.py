"""RDF readers: triples become edges, labels and descriptions become texts, other literals attributes.

N-Triples, N-Quads, Turtle and TriG stream through oxigraph's Rust parser (the W3C grammars, strictly;
memory independent of the file's size, but for one key per blank node of a Turtle or TriG file). RDF/XML and JSON-LD go through rdflib, which holds a whole
document in memory: oxigraph 0.5 reads a truncated RDF/XML document without an error and names no line
for XML errors, and its JSON-LD reader is new; rdflib's are the proven ones for these rarer formats.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

from kalmkg.errors import KalmkgError
from kalmkg.ingestion.batches import MAX_VALUE_CHARS, Batch, Batcher, value_too_long
from kalmkg.ingestion.sources import OXIGRAPH_FORMATS, ContentCheck, blank_prefix, broken_archive, open_source

RDFS = "http://www.w3.org/2000/01/rdf-schema#"
SKOS = "http://www.w3.org/2004/02/skos/core#"
# Lower rank wins when an entity has several.
LABEL_PREDICATES = {
    RDFS + "label": 0, SKOS + "prefLabel": 1, "https://schema.org/name": 2, "http://schema.org/name": 2,
    "http://xmlns.com/foaf/0.1/name": 3,
}
DESCRIPTION_PREDICATES = {
    RDFS + "comment": 0, "https://schema.org/description": 1, "http://schema.org/description": 1,
    SKOS + "definition": 2, "http://purl.org/dc/terms/description": 3,
}
XSD_STRING = "http://www.w3.org/2001/XMLSchema#string"
_RDFLIB_FORMATS = {"turtle": "turtle", "trig": "trig", "rdfxml": "xml", "jsonld": "json-ld"}


class _Router:
    """Sends each (subject, predicate, object) to edges, texts or attributes of a Batcher."""

    def __init__(self, batcher: Batcher, path: Path):
        self.b, self.path = batcher, path
        (self.eh, self.er, self.et, self.es) = batcher.columns["stage_edges"]
        (self.xk, self.xtarget, self.xfield, self.xrank, self.xlang, self.xvalue) = batcher.columns["stage_texts"]
        (self.ak, self.ap, self.av, self.adt, self.alang) = batcher.columns["stage_attrs"]

    def edge(self, s: str, p: str, o: str) -> None:
        self.eh.append(s)
        self.er.append(p)
        self.et.append(o)
        self.es.append("train")
        self.b.rows += 1

    def literal(self, s: str, p: str, value: str, datatype: str, lang: str) -> None:
        if len(value) > MAX_VALUE_CHARS:
            raise KalmkgError(value_too_long(str(self.path), f"a literal of <{s[:80]}> <{p[:80]}>", len(value)))
        lang = lang.lower()  # language tags are case-insensitive (BCP 47); parsers differ in case
        rank = LABEL_PREDICATES.get(p)
        field = "label"
        if rank is None:
            rank = DESCRIPTION_PREDICATES.get(p)
            field = "description"
        if rank is not None:
            self.xk.append(s)
            self.xtarget.append("any")
            self.xfield.append(field)
            self.xrank.append(rank)
            self.xlang.append(lang)
            self.xvalue.append(value)
        else:
            self.ak.append(s)
            if datatype == XSD_STRING:  # plain and xsd:string literals are the same value in RDF 1.1
                datatype = ""
            self.ap.append(p)
            self.av.append(value)
            self.adt.append(datatype)
            self.alang.append(lang)
        self.b.rows += 1


def read_rdf(path: Path, fmt: str, source_tag: str, on_bytes: Callable[[int], None] | None = None,
             compression: str | None = None, check: ContentCheck | None = None) -> Iterator[Batch]:
    """Yield staging batches for one RDF file (`compression`: 'gz', 'bz2', 'xz', streamed). Blank nodes
    get keys `_:<source_tag>:<id>`. `check` (oxigraph's formats) sees every byte of the content as the
    parser reads it."""
    if fmt in OXIGRAPH_FORMATS:
        yield from _read_oxigraph(path, fmt, source_tag, on_bytes, compression, check)
    else:
        assert check is None, "rdflib's formats are checked before they are read"
        yield from _read_rdflib(path, fmt, source_tag, on_bytes, compression)


def base_iri(path: Path, compression: str | None) -> str:
    """The file's own URI, against which relative IRIs resolve; `dump.ttl.gz` resolves as `dump.ttl` does
    (one content, one graph)."""
    path = path.resolve()
    return (path.with_name(path.stem) if compression else path).as_uri()


class _BlankNodes:
    """Keys for blank nodes, stable for a given file. N-Triples and N-Quads labels are the document's own
    (`_:b1` stays `b1`); Turtle and TriG parsers invent a random id for every `[ ... ]`, so there every
    blank node is numbered in the order it first appears."""

    def __init__(self, prefix: str, keep_labels: bool):
        self.prefix = prefix
        self.keep_labels = keep_labels
        self.numbers: dict[str, str] = {}

    def key(self, label: str) -> str:
        if self.keep_labels:
            return self.prefix + label
        key = self.numbers.get(label)
        if key is None:
            key = self.numbers[label] = f"{self.prefix}n{len(self.numbers) + 1}"
        return key


def _read_oxigraph(path: Path, fmt: str, source_tag: str, on_bytes, compression: str | None,
                   check: ContentCheck | None = None) -> Iterator[Batch]:
    import pyoxigraph as ox

    batcher = Batcher()
    route = _Router(batcher, path)
    blank_key = _BlankNodes(blank_prefix(source_tag), keep_labels=fmt in ("ntriples", "nquads")).key
    named, blank, literal = ox.NamedNode, ox.BlankNode, ox.Literal
    rdf_format = {"ntriples": ox.RdfFormat.N_TRIPLES, "nquads": ox.RdfFormat.N_QUADS,
                  "turtle": ox.RdfFormat.TURTLE, "trig": ox.RdfFormat.TRIG}[fmt]
    # the edge columns' appends bound once: this loop runs once per triple of a dump
    heads, relations, tails, splits = (column.append for column in batcher.columns["stage_edges"])
    reader = open_source(path, compression, on_bytes, check)
    try:
        # relative IRIs resolve against the file itself, as rdflib resolved them
        for s, p, o, _ in ox.parse(reader, format=rdf_format, base_iri=base_iri(path, compression)):
            kind = type(s)
            skey = s.value if kind is named else (blank_key(s.value) if kind is blank else None)
            if skey is None:
                raise KalmkgError(f"{path}: RDF-star quoted triples are not supported")
            kind = type(o)
            if kind is named or kind is blank:
                heads(skey)
                relations(p.value)
                tails(o.value if kind is named else blank_key(o.value))
                splits("train")
                batcher.rows += 1
            elif kind is literal:
                lang = o.language
                route.literal(skey, p.value, o.value, "" if lang else o.datatype.value, lang or "")
            else:
                raise KalmkgError(f"{path}: RDF-star quoted triples are not supported")
            if batcher.rows >= batcher.batch_rows:
                yield from batcher.flush()
        while check is not None and reader.read(1 << 16):  # the parser stopped at its end: the check sees all
            pass
    except SyntaxError as exc:
        raise KalmkgError(f"{path}: syntax error: {_oxigraph_message(exc)}") from None
    except MemoryError:  # oxigraph's lexer refuses a term longer than its buffer, which is MAX_VALUE_CHARS
        raise KalmkgError(f"{path}: an IRI or literal longer than {MAX_VALUE_CHARS >> 20} MiB, the parser's limit "
                          "for one term") from None
    except broken_archive(compression) as exc:
        raise KalmkgError(f"{path}: cannot decompress: {_one_line(exc)}") from None
    finally:
        reader.close()
    yield from batcher.flush()


def _read_rdflib(path: Path, fmt: str, source_tag: str, on_bytes, compression: str | None) -> Iterator[Batch]:
    import rdflib

    graph = rdflib.Dataset(default_union=True) if fmt == "trig" else rdflib.Graph()
    # Keep literals as written ("0042"^^xsd:integer stays "0042"), as the N-Triples reader does;
    # rdflib reads this module flag when it creates each literal, so restore it right after.
    normalize = rdflib.NORMALIZE_LITERALS
    rdflib.NORMALIZE_LITERALS = False
    # rdflib logs a traceback for a literal whose lexical form is not of its datatype ("flargh"^^xsd:integer,
    # valid RDF): kalmkg keeps the lexical form as written and prints one line per problem, so quiet it
    term_log = logging.getLogger("rdflib.term")
    level = term_log.level
    term_log.setLevel(logging.CRITICAL)
    try:
        if compression is None:
            graph.parse(str(path), format=_RDFLIB_FORMATS[fmt])
        else:
            with open_source(path, compression, None) as stream:
                graph.parse(source=stream, format=_RDFLIB_FORMATS[fmt], publicID=base_iri(path, compression))
    except broken_archive(compression) as exc:
        raise KalmkgError(f"{path}: cannot decompress: {_one_line(exc)}") from None
    except Exception as exc:  # rdflib raises a different type per parser
        raise KalmkgError(f"{path}: syntax error: {_syntax_message(exc)}") from None
    finally:
        rdflib.NORMALIZE_LITERALS = normalize
        term_log.setLevel(level)
    if on_bytes:
        on_bytes(path.stat().st_size)
    keys = _blank_node_keys(graph, blank_prefix(source_tag))
    batcher = Batcher()
    route = _Router(batcher, path)
    for s, p, o in graph.triples((None, None, None)):
        skey = keys[s] if isinstance(s, rdflib.BNode) else str(s)
        if isinstance(o, rdflib.Literal):
            lang = o.language or ""
            route.literal(skey, str(p), str(o), "" if lang or o.datatype is None else str(o.datatype), lang)
        else:
            route.edge(skey, str(p), keys[o] if isinstance(o, rdflib.BNode) else str(o))
        if batcher.full():
            yield from batcher.flush()
    yield from batcher.flush()


def _blank_node_keys(graph, prefix: str) -> dict:
    """Stable keys for blank nodes: rdflib invents random ids on every parse, so name each blank node
    by a hash of what it says (its outgoing triples, recursively) and where it is used (its incoming
    IRI subjects). Blank nodes that say exactly the same thing in the same place are merged, which
    leaves the graph's meaning unchanged."""
    import rdflib

    out: dict = {}
    incoming: dict = {}
    for s, p, o in graph.triples((None, None, None)):
        if isinstance(s, rdflib.BNode):
            out.setdefault(s, []).append((p, o))
        if isinstance(o, rdflib.BNode):
            out.setdefault(o, [])
            if not isinstance(s, rdflib.BNode):
                incoming.setdefault(o, []).append(f"{s.n3()} {p.n3()}")
    memo: dict = {}

    def digest(node, path: frozenset) -> str:
        if node in memo:
            return memo[node]
        if node in path:  # a cycle of blank nodes: cut it
            return "cycle"
        parts = sorted(
            f"{p.n3()} " + (digest(o, path | {node}) if isinstance(o, rdflib.BNode) else o.n3())
            for p, o in out[node]
        )
        parts += sorted("<- " + x for x in incoming.get(node, []))
        memo[node] = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
        return memo[node]

    try:
        return {node: prefix + digest(node, frozenset()) for node in out}
    except RecursionError:  # a blank-node chain too deep to hash (a very long RDF list)
        return {node: prefix + str(node) for node in out}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _oxigraph_message(exc: SyntaxError) -> str:
    """"Parser error at line 3 column 11: . is not a valid RDF object (line 3)" -> "line 3 column 11: . is
    not a valid RDF object"."""
    text = _one_line(exc)
    text = re.sub(r"^Parser error at ", "", text)
    return re.sub(r" \(line \d+\)$", "", text)


def _syntax_message(exc: BaseException) -> str:
    text = str(exc)
    # rdflib's Turtle parser: "at line 3 of <>:\nBad syntax (objectList expected) at ^ in: ..."
    line = re.search(r"line (\d+)", text)
    what = re.search(r"Bad syntax \(([^)]*)\)", text)
    if what:
        return f"line {line.group(1) if line else '?'}: {what.group(1)}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return " ".join(first.split())[:300]
