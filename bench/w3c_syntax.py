"""The W3C RDF 1.1 syntax test suites through `kalmkg.ingestion.ingest`: every positive test (syntax and
eval) must ingest, every negative one must be refused with a KalmkgError (one line) and nothing else may
escape. Counts per suite and the failures.

    python bench/w3c_syntax.py --suites PATH/rdf-tests/rdf/rdf11

PATH is a checkout of https://github.com/w3c/rdf-tests (not shipped with kalmkg). Each test ingests into a
fresh workspace that already holds one triple, so a refused file must also leave that store as it was.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITES = {"rdf-turtle": "turtle", "rdf-trig": "trig", "rdf-n-triples": "ntriples", "rdf-n-quads": "nquads",
          "rdf-xml": "rdfxml"}
MF = "http://www.w3.org/2001/sw/DataAccess/tests/test-manifest#"


def tests_of(folder: Path) -> list[tuple[Path, bool]]:
    """(file, negative) for every test of a suite's manifest."""
    import rdflib

    g = rdflib.Graph()
    g.parse(folder / "manifest.ttl", format="turtle", publicID=(folder / "manifest.ttl").as_uri())
    out = []
    for test, kind in g.subject_objects(rdflib.RDF.type):
        action = g.value(test, rdflib.URIRef(MF + "action"))
        if action is not None:
            out.append((Path(str(action).removeprefix("file://")), "Negative" in str(kind)))
    return sorted(out)


def outcome(path: Path, fmt: str, seed: Path) -> str:
    from kalmkg.errors import KalmkgError
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    home = Path(tempfile.mkdtemp())
    ws = Workspace(home / "ws")
    try:
        with Store.open(ws, create=True) as store:
            ingest(store, resolve_sources([seed]))
            before = store.con.execute("SELECT count(*) FROM triples").fetchone()[0]
        try:
            with Store.open(ws, create=True) as store:
                ingest(store, resolve_sources([path], fmt))
            return "ingested"
        except KalmkgError:
            with Store.open(ws) as store:
                after = store.con.execute("SELECT count(*) FROM triples").fetchone()[0]
            return "refused" if after == before else "refused, store changed"
        except Exception as exc:  # noqa: BLE001 - what the user would see as a crash
            return f"crash: {type(exc).__name__}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", type=Path, required=True, help="rdf-tests/rdf/rdf11")
    args = parser.parse_args()
    seed = Path(tempfile.mkdtemp()) / "seed.tsv"
    seed.write_text("s\tp\to\n")
    counts: collections.Counter = collections.Counter()
    failures = []
    for suite, fmt in SUITES.items():
        for path, negative in tests_of(args.suites / suite):
            got = outcome(path, fmt, seed)
            right = got == ("refused" if negative else "ingested")
            counts[(suite, negative, right)] += 1
            if not right:
                failures.append(f"{suite}/{path.name} ({'negative' if negative else 'positive'}): {got}")
    print("| suite | positive | negative |\n|---|---|---|")
    for suite in SUITES:
        cells = [f"{counts[(suite, neg, True)]}/{counts[(suite, neg, True)] + counts[(suite, neg, False)]}"
                 for neg in (False, True)]
        print(f"| {suite} | {cells[0]} | {cells[1]} |")
    right = sum(n for (_, _, ok), n in counts.items() if ok)
    print(f"\n{right} of {sum(counts.values())} tests behave")
    for line in failures:
        print("  " + line)


if __name__ == "__main__":
    main()
