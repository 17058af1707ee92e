"""The graph back out of the store: `kalmkg sql` (read-only, no file access) and `kalmkg dump` (N-Triples
that ingest back to the same graph, Parquet tables that keep everything)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_graph import assert_one_line_error, contents, ingest_into, run_kalmkg, write


@pytest.fixture()
def sample(world) -> Path:
    """The sample graph, unsplit (conftest's `world`), by its folder; tests only read it."""
    return world.root


def test_sql_answers_a_query_as_a_table_and_as_json(sample, tmp_path):
    query = ("SELECT r.label, count(*) AS n FROM triples t JOIN relations r ON r.id = t.relation "
             "GROUP BY 1 ORDER BY n DESC, 1 LIMIT 3")
    rows = json.loads(run_kalmkg("-w", sample, "sql", query, "--json", cwd=tmp_path).stdout)
    assert rows[0] == {"label": "member of", "n": 47} and len(rows) == 3
    table = run_kalmkg("-w", sample, "sql", query, cwd=tmp_path)
    assert table.returncode == 0 and "member of" in table.stdout and "3 rows" in table.stdout


@pytest.mark.parametrize("statement, words", [
    ("DELETE FROM triples", "read-only"),
    ("CREATE TABLE x (a INT)", "read-only"),
    ("COPY triples TO '{tmp}/out.csv'", "disabled"),
    ("SELECT * FROM read_csv('{tmp}/secret.csv')", "disabled"),
    ("ATTACH '{tmp}/other.duckdb'", "disabled"),
    ("SET enable_external_access = true", "locked"),
    ("SELEC 1", "syntax"),
])
def test_sql_cannot_change_the_graph_or_touch_files(sample, tmp_path, statement, words):
    write(tmp_path / "secret.csv", "a\n1\n")
    before = contents(sample)
    proc = run_kalmkg("-w", sample, "sql", statement.format(tmp=tmp_path), cwd=tmp_path)
    assert_one_line_error(proc, "SQL:")
    assert words in proc.stderr.lower()
    assert contents(sample) == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()


def test_dump_ntriples_ingests_back_to_the_same_graph(sample, tmp_path):
    out = tmp_path / "graph.nt"
    proc = run_kalmkg("-w", sample, "dump", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"-> {out}" in proc.stderr
    again = tmp_path / "again"
    ingest_into(again, [out])
    a, b = _blank_nodes_by_label(contents(sample)), _blank_nodes_by_label(contents(again))
    assert any(k.startswith("_:") for k in a["entities"])  # the sample has blank nodes
    for part in ("triples", "entities", "relations", "attributes"):
        assert a[part] == b[part], part
    stdout = run_kalmkg("-w", sample, "dump", cwd=tmp_path).stdout
    assert stdout == out.read_text(encoding="utf-8")


def _blank_nodes_by_label(snap: dict) -> dict:
    """A blank node's key names it in one document only (a new ingest gives it a new one): by its label."""
    name = {k: f"_:{label}" for k, (label, _) in snap["entities"].items() if k.startswith("_:")}
    key = lambda k: name.get(k, k)  # noqa: E731
    return {"triples": {(key(h), r, key(t), s) for h, r, t, s in snap["triples"]},
            "entities": {key(k): v for k, v in snap["entities"].items()}, "relations": snap["relations"],
            "attributes": {(key(e), *rest) for e, *rest in snap["attributes"]}}


def test_dump_makes_iris_of_tsv_ids_and_escapes_literals(tmp_path):
    ws = tmp_path / "ws"
    write(tmp_path / "g.tsv", '/m/027rn\t/film/genre\t00001740\nq"uote\tr\t_:b1\n')
    write(tmp_path / "entity2text.txt", '/m/027rn\tDominican "Republic"\\ \n')
    ingest_into(ws, [tmp_path / "g.tsv", tmp_path / "entity2text.txt"])
    text = run_kalmkg("-w", ws, "dump", cwd=tmp_path).stdout
    assert "<urn:kalmkg:key:%2Fm%2F027rn> <urn:kalmkg:key:%2Ffilm%2Fgenre> <urn:kalmkg:key:00001740> ." in text
    assert '"Dominican \\"Republic\\"\\\\"' in text
    import pyoxigraph as ox

    assert len(list(ox.parse(text.encode(), ox.RdfFormat.N_TRIPLES))) == len(text.strip().splitlines())


def test_dump_parquet_keeps_keys_splits_labels_and_attributes(sample, tmp_path):
    import pyarrow.parquet as pq

    import shutil

    ws, out = tmp_path / "ws", tmp_path / "tables"
    shutil.copytree(sample, ws)
    split = run_kalmkg("-w", ws, "split", "--valid", "0.1", "--test", "0.1", "--json", cwd=tmp_path)
    assert json.loads(split.stdout) == {"train": 244, "valid": 30, "test": 30}
    proc = run_kalmkg("-w", ws, "dump", "--format", "parquet", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["attributes.parquet", "entities.parquet", "relations.parquet",
                                                     "triples.parquet"]
    snap = contents(ws)
    assert set(snap["splits"]) == {"train", "valid", "test"}
    triples = pq.read_table(out / "triples.parquet").to_pylist()
    assert {(t["head"], t["relation"], t["tail"], t["split"]) for t in triples} == snap["triples"]
    entities = pq.read_table(out / "entities.parquet").to_pylist()
    assert {e["key"]: (e["label"], e["description"]) for e in entities} == snap["entities"]
    attributes = pq.read_table(out / "attributes.parquet").to_pylist()
    assert {tuple(a.values()) for a in attributes} == snap["attributes"]


@pytest.mark.parametrize("args, words", [
    (["--format", "xml"], "unknown dump format 'xml'"),
    (["--format", "parquet"], "--out DIR"),
])
def test_dump_refuses_what_it_cannot_write(sample, tmp_path, args, words):
    assert_one_line_error(run_kalmkg("-w", sample, "dump", *args, cwd=tmp_path), words)


def test_a_dump_that_fails_leaves_no_partial_file(sample, tmp_path, monkeypatch):
    from kalmkg import dump
    from kalmkg.files import atomic_path
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    out = write(tmp_path / "graph.nt", "old\n")

    def fail(store, fh):
        fh.write(b"<a> <b> <c> .\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dump, "dump_ntriples", fail)
    with pytest.raises(OSError), Store.open(Workspace(sample)) as store, atomic_path(out) as staged:
        with open(staged, "wb") as fh:
            dump.dump_ntriples(store, fh)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["graph.nt"]


def test_dump_replaces_an_earlier_dump_but_never_a_users_folder(sample, tmp_path):
    tables = tmp_path / "tables"
    assert run_kalmkg("-w", sample, "dump", "-f", "parquet", "-o", tables, cwd=tmp_path).returncode == 0
    assert run_kalmkg("-w", sample, "dump", "-f", "parquet", "-o", tables, cwd=tmp_path).returncode == 0  # again
    mine = tmp_path / "mine"
    write(mine / "notes.txt", "keep me")
    assert_one_line_error(run_kalmkg("-w", sample, "dump", "-f", "parquet", "-o", mine, cwd=tmp_path),
                          "holds files kalmkg did not write")
    assert_one_line_error(run_kalmkg("-w", sample, "dump", "-o", mine, cwd=tmp_path), "is a folder")
    assert (mine / "notes.txt").read_text() == "keep me"
