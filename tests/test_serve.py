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
from pathlib import Path

import numpy as np
import pytest

from helpers_graph import assert_one_line_error, cli_env, run_kalmkg

pytestmark = pytest.mark.slow
KEY = "test-key"


KALMKG = [sys.executable, "-m", "kalmkg"]
WITHOUT_ML = [sys.executable, str(Path(__file__).parent / "without_ml.py")]  # no torch, transformers, peft


def start_server(ws_root, *args, tmp_path, timeout: float = 180, launcher=KALMKG):
    """`kalmkg serve --port 0` in its own process; (process, base URL) once /health answers."""
    import requests

    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*launcher, "-w", str(ws_root), "serve", "--port", "0",
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
    # one string as input: base64 and floats are the same vector; against the batch of two, llama.cpp's
    # sums run in another order, so equal only to rounding (CI saw 1.5e-6)
    raw = http(server, "POST", "/v1/embeddings", json={"input": "Paris", "encoding_format": "base64"}).json()
    alone = http(server, "POST", "/v1/embeddings", json={"input": "Paris", "encoding_format": "float"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.allclose(decoded, np.array(alone["data"][0]["embedding"], dtype=np.float32), atol=1e-6)
    assert np.allclose(decoded, vectors[0], atol=1e-5)
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


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture()
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make test` installs them with apt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_the_web_page_answers_draws_the_facts_and_predicts(server, browser, tmp_path):
    """In headless Chromium: type the key and a question, get the streamed answer, its three facts as a
    list and as a drawn graph (the founders marked as the answer), then predict a link by name."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)
    browser.find_element(By.ID, "question").send_keys("Who founded Apple?", Keys.ENTER)
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                      == "answered")
    answer = browser.find_element(By.ID, "answer").text
    assert all(name in answer for name in ("Steve Jobs", "Steve Wozniak", "Ronald Wayne")), answer
    assert "Facts:" not in answer  # the facts have their own list
    facts = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#facts li")]
    assert len(facts) == 3 and all(f.startswith("Apple Inc. founded by ") for f in facts)
    drawn = {c.get_attribute("data-entity"): c.get_attribute("class")
             for c in browser.find_elements(By.CSS_SELECTOR, "#graph circle")}
    assert drawn == {"Apple Inc.": "asked", "Steve Jobs": "answer", "Steve Wozniak": "answer", "Ronald Wayne": "answer"}
    edges = [line.get_attribute("data-relation") for line in browser.find_elements(By.CSS_SELECTOR, "#graph line")]
    assert edges == ["founded by"] * 3
    positions = {(c.get_attribute("cx"), c.get_attribute("cy")) for c in browser.find_elements(By.CSS_SELECTOR, "#graph circle")}
    assert len(positions) == 4  # laid out, not piled up
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "model r-F16")

    for field, value in (("head", "Paris"), ("relation", "capital_of")):
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#predict-form button").click()
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions tr")) == 11)
    header = browser.find_element(By.CSS_SELECTOR, "#predictions tr").text
    assert "Paris capital of ?" in header
    shot = tmp_path / "kalmkg-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_the_page_says_a_missing_key(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server + "/")
    browser.find_element(By.ID, "question").send_keys("Who founded Apple?", Keys.ENTER)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                     == "answered")
    assert "API key" in browser.find_element(By.ID, "answer").text


def test_serving_needs_no_torch_transformers_or_peft(exported, tmp_path):
    """A plain `pip install kalmkg` (no `train` extra): ingest, stats, ask, predict through the GGUF and
    serve work with torch, transformers, peft, accelerate, safetensors and sentencepiece unimportable;
    training says in one line what to install."""
    import requests

    ws = tmp_path / "ws"
    shutil.copytree(exported.root, ws)

    def bare(*args, where=ws):
        return subprocess.run([*WITHOUT_ML, "-w", str(where), *map(str, args)], capture_output=True, text=True,
                              env=cli_env(), cwd=tmp_path, timeout=300)

    extra = tmp_path / "extra.tsv"
    extra.write_text("Atlantis\tcapital_of\tPoseidonia\n")
    for args in (["ingest", extra], ["stats", "--json"], ["entities", "Atlantis", "--json"], ["split", "--json"],
                 ["dump"]):
        done = bare(*args, where=tmp_path / "new")
        assert done.returncode == 0, (args, done.stderr)
    for args in (["stats", "--json"], ["predict", "Paris", "capital_of", "?", "--backend", "gguf", "--json", "-k", "3"],
                 ["ask", "Who founded Apple?", "--json"], ["runs", "--json"], ["sql", "SELECT count(*) FROM triples"]):
        done = bare(*args)
        assert done.returncode == 0, (args, done.stderr)
    assert "Steve Jobs" in json.loads(bare("ask", "Who founded Apple?", "--json").stdout)["answer"]
    assert_one_line_error(bare("train", "--max-steps", "1"), "pip install 'kalmkg[train]'", "'torch'")
    proc, url = start_server(ws, tmp_path=tmp_path, launcher=WITHOUT_ML)
    try:
        chat = requests.post(url + "/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "Who founded Apple?"}]}, timeout=120).json()
        assert "Steve Wozniak" in chat["choices"][0]["message"]["content"]
        predicted = requests.post(url + "/v1/predict", json={"head": "Paris", "relation": "capital_of", "tail": "?"},
                                  timeout=120).json()
        assert len(predicted["results"]) == 10
        embedded = requests.post(url + "/v1/embeddings", json={"input": ["Paris"]}, timeout=120).json()
        assert len(embedded["data"][0]["embedding"]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
