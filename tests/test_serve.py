"""`kalmkg serve`: a real server in its own process on a free loopback port, spoken to by the official
`openai` client (chat, streaming, embeddings, models, errors) and plainly over HTTP (ask, predict,
entities, the API key, concurrent clients)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers_graph import assert_one_line_error, cli_env, run_kalmkg

pytestmark = pytest.mark.slow
KEY = "test-key"


def start_server(ws_root, *args, tmp_path, timeout: float = 180):
    """`kalmkg serve --port 0` in its own process; (process, base URL) once /health answers."""
    import requests

    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kalmkg", "-w", str(ws_root), "serve", "--port", "0",
                             "--threads", "1", *args], stdout=log, stderr=subprocess.STDOUT, env=cli_env(COLUMNS="300"),
                            cwd=tmp_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        found = re.search(r"on (http://127\.0\.0\.1:\d+) ", (tmp_path / "serve.log").read_text())
        if found:
            try:
                if requests.get(found.group(1) + "/health", timeout=5).status_code == 200:
                    return proc, found.group(1)
            except requests.RequestException:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start: " + (tmp_path / "serve.log").read_text())


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    shutil.copytree(exported.root, tmp / "ws")
    proc, url = start_server(tmp / "ws", "--api-key", KEY, tmp_path=tmp)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(server, method: str, path: str, **kwargs):
    import requests

    headers = kwargs.pop("headers", {"Authorization": f"Bearer {KEY}"})
    return requests.request(method, server + path, headers=headers, timeout=120, **kwargs)


def test_models_lists_the_export(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["r-F16"] and models.data[0].owned_by == "kalmkg"


def test_chat_answers_from_the_graph_with_citations_and_the_structured_answer(client):
    reply = client.chat.completions.create(model="r-F16", messages=[
        {"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Who founded Apple?"}])
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    for founder in ("Steve Jobs", "Steve Wozniak", "Ronald Wayne"):
        assert founder in content
    assert "\n\nFacts:\n[1] Apple Inc. — founded by — " in content
    answer = reply.model_extra["kalmkg"]
    assert {e["label"] for e in answer["chosen"]["entities"]} == {"Steve Jobs", "Steve Wozniak", "Ronald Wayne"}
    assert answer["chosen"]["path"] == ["founded by"] and answer["chosen"]["source"] == "graph"
    assert len(answer["facts"]) == 3


def test_a_streamed_chat_says_what_the_whole_one_says(client):
    messages = [{"role": "user", "content": "What is the nationality of Marie Curie's spouse?"}]
    whole = client.chat.completions.create(model="r-F16", messages=messages)
    chunks = list(client.chat.completions.create(model="r-F16", messages=messages, stream=True))
    assert len(chunks) >= 3 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert chunks[-1].model_extra["kalmkg"]["chosen"]["entities"][0]["label"] == "France"
    assert "France" in whole.choices[0].message.content


def test_a_question_about_nothing_in_the_graph_is_not_answered(client):
    reply = client.chat.completions.create(model="r-F16", messages=[
        {"role": "user", "content": "How tall is the Zorblax tower?"}])
    assert reply.model_extra["kalmkg"]["matched"] is False
    assert reply.model_extra["kalmkg"]["chosen"] is None


def test_embeddings_are_the_exports_vectors_as_floats_and_base64(client, server, exported):
    from kalmkg.encode import GGUFEncoder

    texts = ["Paris", "Marie Curie (physicist)"]
    got = client.embeddings.create(model="r-F16", input=texts)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    plain = http(server, "POST", "/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    assert np.allclose(vectors, np.array([d["embedding"] for d in plain["data"]], dtype=np.float32), atol=1e-6)
    raw = http(server, "POST", "/v1/embeddings", json={"input": "Paris", "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), vectors[0], atol=1e-6)
    expected = GGUFEncoder(exported.models_dir / "r-F16.gguf", truncate=True).encode(texts)
    assert (vectors * expected).sum(1).min() > 0.999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert got.usage.prompt_tokens > 0 and [d.index for d in got.data] == [0, 1]


def test_native_predict_entities_and_ask(server, exported):
    from kalmkg.prediction import predict

    got = http(server, "POST", "/v1/predict", json={"head": "Paris", "relation": "capital_of", "tail": "?", "k": 4})
    assert got.status_code == 200, got.text
    body = got.json()
    expected = predict(exported, "Paris", "capital_of", "?", k=4, backend="gguf").to_json()
    assert [r["key"] for r in body["results"]] == [r["key"] for r in expected["results"]]
    assert body["query"] == ["Paris", "capital of", "?"] and len(body["results"]) == 4
    found = http(server, "GET", "/v1/entities", params={"q": "Marie Cury"}).json()
    assert found["data"][0]["label"] == "Marie Curie"
    asked = http(server, "POST", "/v1/ask", json={"question": "Who founded Apple?", "hops": 1}).json()
    assert asked["matched"] and len(asked["chosen"]["entities"]) == 3


def test_bad_requests_are_one_message_each(client, server):
    import openai

    with pytest.raises(openai.BadRequestError, match="no question"):
        client.chat.completions.create(model="r-F16", messages=[{"role": "system", "content": "hi"}])
    unknown = http(server, "POST", "/v1/predict", json={"head": "Atlantis", "relation": "capital_of", "tail": "?"})
    assert unknown.status_code == 400 and "Atlantis" in unknown.json()["error"]["message"]
    assert "\n" not in unknown.json()["error"]["message"]
    invalid = http(server, "POST", "/v1/predict", json={"head": "Paris", "relation": "capital_of", "tail": "?",
                                                        "k": 0})
    assert invalid.status_code == 400 and "k" in invalid.json()["error"]["message"]
    hops = http(server, "POST", "/v1/ask", json={"question": "Who founded Apple?", "hops": 5})
    assert hops.status_code == 400 and "hops" in hops.json()["error"]["message"]


def test_the_api_key_is_required(server):
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        denied = http(server, "GET", "/v1/models", headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http(server, "GET", "/health", headers={}).status_code == 200  # a probe needs no key


def test_concurrent_clients_get_the_answers_one_client_gets(client, server):
    """Requests queue for the one llama.cpp model: answers and predictions under 8 concurrent clients are
    those of the same requests made one at a time (a shared context misused would mix them up)."""
    questions = ["Who founded Apple?", "What is the nationality of Marie Curie's spouse?",
                 "Where was Bill Gates born?", "Who founded Microsoft?"]
    queries = [("Paris", "capital_of", "?"), ("?", "founded_by", "Bill Gates")]

    def chat(q):
        return client.chat.completions.create(model="r-F16", messages=[{"role": "user", "content": q}]) \
            .choices[0].message.content

    def pred(q):
        return [r["key"] for r in http(server, "POST", "/v1/predict", json=dict(zip(("head", "relation", "tail"), q),
                                                                               k=5)).json()["results"]]

    alone = [chat(q) for q in questions] + [pred(q) for q in queries]
    work = [(chat, q) for q in questions] * 3 + [(pred, q) for q in queries] * 4
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda w: w[0](w[1]), work))
    expected = {**{q: a for q, a in zip(questions, alone)}, **{q: a for q, a in zip(queries, alone[len(questions):])}}
    assert together == [expected[q] for _, q in work]
    health = http(server, "GET", "/health").json()
    assert health["waiting"] == 0 and health["requests"] >= len(work)


def test_serve_refuses_a_port_in_use_and_a_missing_graph(exported, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_kalmkg("-w", exported.root, "serve", "--port", port, cwd=tmp_path)
        assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}")
    assert_one_line_error(run_kalmkg("-w", tmp_path / "none", "serve", cwd=tmp_path), "no graph")
    assert_one_line_error(run_kalmkg("-w", exported.root, "serve", "--model", "nope", "--port", "0", cwd=tmp_path),
                          "no model 'nope'")


def test_the_served_answer_is_the_cli_answer(server, exported, tmp_path):
    """The server runs `kalmkg ask` itself: the same question gets the same answer in both."""
    cli = json.loads(run_kalmkg("-w", exported.root, "ask", "Who founded Apple?", "--json", cwd=tmp_path,
                                timeout=300).stdout)
    served = http(server, "POST", "/v1/ask", json={"question": "Who founded Apple?"}).json()
    assert served["answer"] == cli["answer"] and served["chosen"] == cli["chosen"]
