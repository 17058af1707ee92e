"""The W3C RDF 1.1 syntax test suites through `kalmkg.ingestion.ingest`: every positive test (syntax and
eval) must ingest, every negative one must be refused with a KalmkgError (one line) and nothing else may
escape. Counts per suite and the failures.

    python bench/w3c_syntax.py                                  # the suites vendored in tests/data/w3c
    python bench/w3c_syntax.py --suites PATH/rdf-tests/rdf/rdf11   # a newer checkout of w3c/rdf-tests

Each test ingests, as `kalmkg ingest` does (Store.edit), into a fresh workspace that already holds one
triple, so a refused file must also leave that store as it was. tests/test_w3c.py runs the same.
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


def seeded_store(home: Path) -> Path:
    """A store holding one triple, copied for each test: a refused file must leave it as it was."""
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    seed = home / "seed.tsv"
    seed.write_text("s\tp\to\n")
    ws = Workspace(home / "seeded")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([seed]))
    return ws.db_path


def outcome(path: Path, fmt: str, seeded: Path) -> str:
    """"ingested", "refused" (a KalmkgError, the store unchanged), "refused, store changed" or "crash: ..."."""
    from kalmkg.errors import KalmkgError
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    home = Path(tempfile.mkdtemp())
    ws = Workspace(home / "ws")
    ws.root.mkdir()
    shutil.copyfile(seeded, ws.db_path)
    try:
        try:
            with Store.edit(ws) as store:
                ingest(store, resolve_sources([path], fmt))
            return "ingested"
        except KalmkgError:
            with Store.open(ws) as store:
                after = store.con.execute("SELECT count(*) FROM triples").fetchone()[0]
            return "refused" if after == 1 else "refused, store changed"
        except Exception as exc:  # noqa: BLE001 - what the user would see as a crash
            return f"crash: {type(exc).__name__}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_suite(folder: Path, fmt: str, seeded: Path) -> tuple[collections.Counter, list[str]]:
    """Counts by (negative, behaved) and a line for each test that did not behave."""
    counts: collections.Counter = collections.Counter()
    failures = []
    for path, negative in tests_of(folder):
        got = outcome(path, fmt, seeded)
        right = got == ("refused" if negative else "ingested")
        counts[(negative, right)] += 1
        if not right:
            failures.append(f"{folder.name}/{path.relative_to(folder)} ({'negative' if negative else 'positive'}): {got}")
    return counts, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", type=Path, default=ROOT / "tests" / "data" / "w3c",
                        help="the suites' folder: tests/data/w3c (vendored), or rdf-tests/rdf/rdf11")
    args = parser.parse_args()
    seeded = seeded_store(Path(tempfile.mkdtemp()))
    print("| suite | positive | negative |\n|---|---|---|")
    behaved = total = 0
    failures = []
    for suite, fmt in SUITES.items():
        counts, failed = run_suite(args.suites / suite, fmt, seeded)
        cells = [f"{counts[(neg, True)]}/{counts[(neg, True)] + counts[(neg, False)]}" for neg in (False, True)]
        print(f"| {suite} | {cells[0]} | {cells[1]} |")
        behaved += counts[(False, True)] + counts[(True, True)]
        total += sum(counts.values())
        failures += failed
    print(f"\n{behaved} of {total} tests behave")
    for line in failures:
        print("  " + line)


if __name__ == "__main__":
    main()
