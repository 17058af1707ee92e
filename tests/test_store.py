"""`kalmkg.store` and `kalmkg.workspace`: opening, schema and migrations, transactions, stats, entity search."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from helpers_graph import SAMPLE_TSV, SAMPLE_TTL, contents, ingest_into, ingest_read
from kalmkg.cli.app import app
from kalmkg.errors import KalmkgError
from kalmkg.store import MIGRATIONS, SCHEMA_VERSION, Store
from kalmkg.workspace import DEFAULT_WORKSPACE, ENV_VAR, Workspace

TABLES = {"meta", "entities", "relations", "triples", "attributes", "ingests", "source_files"}
KG = "http://example.org/kg/"


@pytest.fixture(scope="module")
def sample_ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store") / "ws"
    ingest_into(root, [SAMPLE_TTL])
    return root


# ---------------------------------------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------------------------------------
def test_workspace_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Workspace.resolve().root == tmp_path / DEFAULT_WORKSPACE
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from_env"))
    assert Workspace.resolve().root == tmp_path / "from_env"
    assert Workspace.resolve(tmp_path / "explicit").root == tmp_path / "explicit"  # explicit wins
    assert Workspace.resolve("rel").root == tmp_path / "rel"  # made absolute
    ws = Workspace.resolve("rel")
    assert ws.db_path == tmp_path / "rel" / "kg.duckdb"
    assert not ws.exists()


# ---------------------------------------------------------------------------------------------------------
# Opening, schema, migrations
# ---------------------------------------------------------------------------------------------------------
def test_open_without_a_graph_is_a_clear_error_and_creates_nothing(tmp_path):
    ws = Workspace(tmp_path / "nothing")
    with pytest.raises(KalmkgError, match="no graph in workspace"):
        with Store.open(ws):
            pass
    with pytest.raises(KalmkgError, match="no graph in workspace"):
        with Store.open(ws, write=True):
            pass
    assert not ws.root.exists()


def test_create_makes_the_schema(tmp_path):
    ws = Workspace(tmp_path / "a" / "b" / "ws")
    with Store.open(ws, create=True) as store:
        assert store.writable
        assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        tables = {r[0] for r in store.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        assert tables >= TABLES
        cols = {r[0] for r in store.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'entities'").fetchall()}
        assert {"id", "key", "label", "description"} <= cols
    assert ws.exists()
    with Store.open(ws) as store:  # read-only reopen
        assert not store.writable
        assert store.schema_version() == SCHEMA_VERSION
        with pytest.raises(duckdb.Error):
            store.con.execute("INSERT INTO meta VALUES ('x', 'y')")


def test_a_newer_schema_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        store.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    for write in (False, True):
        with pytest.raises(KalmkgError, match="newer"):
            with Store.open(ws, write=write):
                pass


def test_an_old_store_is_migrated_even_by_a_read_only_open(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    con = duckdb.connect(str(ws.db_path))  # a version-0 file: no meta table, some other data
    con.execute("CREATE TABLE keep_me (x INTEGER)")
    con.execute("INSERT INTO keep_me VALUES (42)")
    con.close()
    with Store.open(ws) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.con.execute("SELECT x FROM keep_me").fetchall() == [(42,)]
        assert store.con.execute("SELECT count(*) FROM entities").fetchone() == (0,)
    # and the migrated store takes an ingest
    assert ingest_into(ws.root, [SAMPLE_TTL])[0].counts.triples == 304


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_store_of_every_earlier_version_is_migrated_with_its_data(tmp_path, version):
    """A workspace written by an older kalmkg (schema `version`) opens with every later migration applied
    and its graph intact."""
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    con = duckdb.connect(str(ws.db_path))
    for statements in MIGRATIONS[:version]:
        for sql in statements:
            con.execute(sql)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
    con.execute("INSERT INTO entities (id, key, label, description, updated_at) VALUES (0, 'k', 'K', NULL, now())")
    con.close()
    with Store.open(ws, write=True) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.con.execute("SELECT id, key, label FROM entities").fetchall() == [(0, "k", "K")]
        n_tables = store.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE'").fetchall()[0][0]
    created = sum(sql.lstrip().upper().startswith("CREATE TABLE") for m in MIGRATIONS for sql in m)
    assert n_tables == created


def test_reopen_keeps_data(sample_ws):
    with Store.open(Workspace(sample_ws)) as store:
        assert store.con.execute("SELECT count(*) FROM triples").fetchone() == (304,)


def test_transaction_rolls_back_on_any_exception(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        for exc in (ValueError("boom"), KeyboardInterrupt()):
            with pytest.raises(type(exc)):
                with store.transaction():
                    store.con.execute("INSERT INTO meta VALUES ('scratch', '1')")
                    raise exc
            assert store.con.execute("SELECT count(*) FROM meta WHERE key = 'scratch'").fetchone() == (0,)
        with store.transaction():
            store.con.execute("INSERT INTO meta VALUES ('scratch', '2')")
    with Store.open(ws) as store:
        assert store.con.execute("SELECT value FROM meta WHERE key = 'scratch'").fetchall() == [("2",)]


# ---------------------------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------------------------
def test_stats_of_the_sample_graph(sample_ws):
    with Store.open(Workspace(sample_ws)) as store:
        s = store.stats()
    assert (s["entities"], s["relations"], s["triples"], s["attributes"]) == (144, 16, 304, 51)
    assert s["splits"] == {"train": 304, "valid": 0, "test": 0}
    assert s["entities_with_description"] == 142  # all but the two blank nodes
    counts = s["relation_counts"]
    assert len(counts) == 16 and sum(r["triples"] for r in counts) == 304
    assert [r["triples"] for r in counts] == sorted((r["triples"] for r in counts), reverse=True)
    assert all(r["train"] == r["triples"] for r in counts)
    by_key = {r["key"]: r for r in counts}
    assert by_key[KG + "capital_of"]["label"] == "capital of"
    assert by_key[KG + "award"]["triples"] == 2
    d = s["degree"]
    assert d["isolated"] == 0 and 1 <= d["min"] <= d["median"] <= d["p99"] <= d["max"]
    assert d["mean"] == round(2 * 304 / 144, 3)  # no self-loops in the sample
    assert [(i["source"], i["format"], i["triples"]) for i in s["ingests"]] == [(str(SAMPLE_TTL), "turtle", 304)]


def test_stats_top_relations_limit(sample_ws):
    with Store.open(Workspace(sample_ws)) as store:
        top = store.stats(top_relations=3)["relation_counts"]
        full = store.stats()["relation_counts"]
    assert top == full[:3]


def test_stats_degree_on_a_hand_made_graph(tmp_path):
    path = tmp_path / "g.tsv"
    # a: 2 (its self-loop counts once), b: 2, c: 1, d: isolated (only in the entity text file)
    path.write_text("a\tr\tb\na\tr\ta\nb\tq\tc\n", encoding="utf-8")
    (tmp_path / "entities.tsv").write_text("d\tDelta\n", encoding="utf-8")
    ingest_into(tmp_path / "ws", [path, tmp_path / "entities.tsv"])
    with Store.open(Workspace(tmp_path / "ws")) as store:
        s = store.stats()
    assert (s["entities"], s["relations"], s["triples"]) == (4, 2, 3)
    assert s["degree"] == {"min": 0, "median": 1, "mean": 1.25, "p99": 2, "max": 2, "isolated": 1}
    assert [(r["key"], r["triples"]) for r in s["relation_counts"]] == [("r", 2), ("q", 1)]


def test_stats_json_via_cli(sample_ws):
    result = CliRunner().invoke(app, ["-w", str(sample_ws), "stats", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert (data["entities"], data["relations"], data["triples"], data["attributes"]) == (144, 16, 304, 51)
    assert data["splits"] == {"train": 304, "valid": 0, "test": 0}
    assert len(data["relation_counts"]) == 16


def test_stats_table_via_cli(sample_ws):
    result = CliRunner().invoke(app, ["-w", str(sample_ws), "stats", "--top", "5"], catch_exceptions=False,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0
    out = result.stdout
    assert "entities" in out and "144" in out and "304 / 0 / 0" in out
    assert "Relations (top 5)" in out and KG + "member_of" in out


def test_tsv_sample_matches_the_turtle_sample(sample_ws, tmp_path):
    """The TSV sample is the same graph as the Turtle one, minus the blank-node awards."""
    _, tsv = ingest_read(tmp_path / "ws", [SAMPLE_TSV])
    ttl = contents(sample_ws)
    assert (len(tsv["entities"]), len(tsv["relations"]), len(tsv["triples"])) == (142, 15, 302)
    assert all(desc for _, desc in tsv["entities"].values())
    local = lambda key: key[len(KG):] if key.startswith(KG) else key  # noqa: E731
    ttl_triples = {(local(h), local(r), local(t)) for h, r, t, _ in ttl["triples"] if r != KG + "award"}
    assert {(h, r, t) for h, r, t, _ in tsv["triples"]} == ttl_triples
    assert tsv["entities"] == {local(k): v for k, v in ttl["entities"].items() if not k.startswith("_:")}
    assert {k: lbl for k, (lbl, _) in tsv["relations"].items()} == \
        {local(k): lbl for k, (lbl, _) in ttl["relations"].items() if k != KG + "award"}


# ---------------------------------------------------------------------------------------------------------
# Entity search
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def find(sample_ws):
    def run(query: str, **kwargs) -> list[dict]:
        with Store.open(Workspace(sample_ws)) as store:
            return store.find_entities(query, **kwargs)
    return run


@pytest.mark.parametrize("query, key, match", [
    ("Paris", "Paris", "exact"),
    ("paris", "Paris", "exact"),  # case-insensitive
    ("PARIS", "Paris", "exact"),
    ("Marie_Curie", "Marie_Curie", "exact"),  # the key's local name
    (KG + "Marie_Curie", "Marie_Curie", "key"),
    ("Mari", "Marie_Curie", "prefix"),
    ("marie c", "Marie_Curie", "prefix"),
    ("Marie Cury", "Marie_Curie", "fuzzy"),
    ("Albert Einstien", "Albert_Einstein", "fuzzy"),
])
def test_find_entities_best_match_first(find, query, key, match):
    found = find(query)
    assert found, query
    assert (found[0]["key"], found[0]["match"]) == (KG + key, match)


def test_find_entities_result_fields(find):
    (top, *_) = find("Marie Curie")
    assert top["label"] == "Marie Curie" and top["match"] == "exact"
    assert top["description"].startswith("Marie Curie was a Polish")
    assert isinstance(top["id"], int) and 0 <= top["similarity"] <= 1


def test_find_entities_orders_tiers_and_limits(find):
    found = find("united", limit=3)
    assert len(found) == 3
    assert all(m["match"] == "prefix" and m["label"].startswith("United") for m in found)
    assert len(find("united", limit=1)) == 1
    tiers = ["key", "exact", "prefix", "substring", "fuzzy"]
    found = find("Mar", limit=50)
    ranks = [tiers.index(m["match"]) for m in found]
    assert ranks == sorted(ranks)
    substring = find("Curie")
    assert {m["key"] for m in substring} >= {KG + "Marie_Curie", KG + "Pierre_Curie"}


def test_find_entities_without_a_match(find):
    assert find("zzqqxxj") == []


def test_entities_json_via_cli(sample_ws):
    result = CliRunner().invoke(app, ["-w", str(sample_ws), "entities", "Marie Cury", "--json", "-n", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    found = json.loads(result.stdout)
    assert 1 <= len(found) <= 2
    assert found[0]["key"] == KG + "Marie_Curie" and found[0]["label"] == "Marie Curie"


def test_entities_table_via_cli(sample_ws):
    result = CliRunner().invoke(app, ["-w", str(sample_ws), "entities", "paris"], catch_exceptions=False,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Paris" in result.stdout and KG + "Paris" in result.stdout and "exact" in result.stdout


# ------------------------------------------------------------------------------------------------ SQL twins
def test_the_sql_twins_of_local_name_and_normalize_agree_with_python():
    from kalmkg.store import _fallback_label_sql, _normalized_sql
    from kalmkg.text import local_name, normalize

    keys = ["http://x.org/New_York", "http://x.org/ns#Caf%C3%A9", "http://x.org/things/Paris/", "urn:isbn:0451450523",
            "Q42", "http://x.org/_", "http://a.example/@_%AA", "http://x.org/50%25_off"]
    con = duckdb.connect()
    got = [r[0] for r in con.execute(f"SELECT {_fallback_label_sql('k')} FROM unnest($keys) WITH ORDINALITY AS u(k, i) "
                                     "ORDER BY i", {"keys": keys}).fetchall()]
    assert got == [local_name(k) for k in keys]
    texts = ["Brasília, D.C.'s  Café", "Émile_Zola", "  New   York  ", "Łódź 2024!"]
    got = [r[0] for r in con.execute(f"SELECT {_normalized_sql('t')} FROM unnest($texts) WITH ORDINALITY AS u(t, i) "
                                     "ORDER BY i", {"texts": texts}).fetchall()]
    assert got == [normalize(t) for t in texts]


def test_entities_named_matches_normalised_names(sample_ws):
    with Store.open(Workspace(sample_ws)) as store:
        exact = store.entities_named(["marie curie", "marie curie", "zzqqxxj"], "exact", per_text=5)
        fuzzy = store.entities_named(["marie cury"], "fuzzy", per_text=5, min_similarity=0.9)
        partial = store.entities_named(["curie"], "partial", per_text=5)
    assert [(t, k) for t, _, k, *_ in exact] == [("marie curie", KG + "Marie_Curie")]
    assert exact[0][-1] is None  # an exact match has no score
    assert fuzzy[0][2] == KG + "Marie_Curie" and 0.9 <= fuzzy[0][-1] < 1
    assert {k for _, _, k, *_ in partial} >= {KG + "Marie_Curie", KG + "Pierre_Curie"}
