"""The HTTP face of a Service, on FastAPI: OpenAI-compatible `/v1/chat/completions` (grounded in the
graph, streamed over SSE), `/v1/embeddings` and `/v1/models`, so the `openai` client and tools built
on it work unchanged; kalmkg's own JSON endpoints `/v1/ask`, `/v1/predict`, `/v1/entities`; and a web
page at `/` (static/index.html, no build step, no dependencies) that uses them.

A chat answer is `kalmkg ask`'s: the message holds the answer and the facts it cites; the structured
answer (chosen entity, path, facts, links, prediction) rides along as a `kalmkg` field of the response
(of the last chunk when streaming). Only the last user message is asked: kalmkg answers questions
about a graph, it does not hold conversations.
"""

from __future__ import annotations

import base64
import hmac
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from kalmkg.errors import KalmkgError
from kalmkg.serve.service import Service


class ChatMessage(BaseModel):
    role: str
    content: Union[str, List[dict], None] = None


class AskOptions(BaseModel):
    """`kalmkg ask`'s options; chat requests take them as extra fields (the openai client's extra_body)."""

    hops: int = 2
    max_facts: int = 8
    no_context: bool = False
    predict: bool = True
    min_precision: float = 0.5
    paraphrase: bool = True


class ChatRequest(AskOptions):
    model: Optional[str] = None
    messages: List[ChatMessage]
    stream: bool = False
    temperature: Optional[float] = None  # kalmkg's default is 0 (greedy), not OpenAI's 1
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None


class AskRequest(AskOptions):
    question: str
    temperature: float = 0.0
    max_tokens: int = Field(96, ge=1)
    seed: int = 0


class EmbeddingRequest(BaseModel):
    input: Union[str, List[str]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"


class PredictRequest(BaseModel):
    head: str
    relation: str
    tail: str
    k: int = Field(10, ge=1, le=1000)
    filter_known: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An error the way OpenAI's API says it (the openai client raises it with the message)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kalmkg", summary="A language model that knows a knowledge graph.",
                  version=_version(), docs_url="/docs", redoc_url=None)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        return _error(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'", "authentication_error")

    @app.exception_handler(KalmkgError)
    async def _kalmkg_error(request: Request, exc: KalmkgError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, problems)

    guarded = [Depends(authorized)]
    page = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        """The web page: a question box, the streamed answer, its facts drawn as a graph, link prediction
        (it calls the API below with the key the user types in)."""
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.model, "requests": service.stats.requests,
                "waiting": service.stats.waiting, "uptime_s": round(time.time() - service.stats.started, 1)}

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict:
        return {"object": "list", "data": [{"id": service.model, "object": "model", "created": service.created,
                                            "owned_by": "kalmkg"}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    def chat(request: ChatRequest):
        question = _last_question(request.messages)
        config = _ask_config(request, temperature=request.temperature or 0.0,
                             max_tokens=request.max_completion_tokens or request.max_tokens or 96,
                             seed=request.seed or 0)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            answer = service.ask(question, config)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": service.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": _with_citations(answer)}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    "kalmkg": answer.to_json()}
        return StreamingResponse(_chat_events(service, question, config, completion_id, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/embeddings", dependencies=guarded)
    def embeddings(request: EmbeddingRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else list(request.input)
        vectors = service.embed(texts)
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.astype("<f4").tobytes()).decode() if request.encoding_format == "base64"
                     else [float(x) for x in v])
            data.append({"object": "embedding", "index": i, "embedding": value})
        n_tokens = sum(len(r) for r in service.asker.embedder.tokenize(texts))
        return {"object": "list", "data": data, "model": service.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/v1/ask", dependencies=guarded)
    def ask(request: AskRequest) -> dict:
        config = _ask_config(request, temperature=request.temperature, max_tokens=request.max_tokens,
                             seed=request.seed)
        return service.ask(request.question, config).to_json()

    @app.post("/v1/predict", dependencies=guarded)
    def predict(request: PredictRequest) -> dict:
        return service.predict(request.head, request.relation, request.tail, request.k,
                               request.filter_known).to_json()

    @app.get("/v1/entities", dependencies=guarded)
    def entities(q: str, limit: int = 10) -> dict:
        return {"query": q, "data": service.entities(q, limit=max(1, min(limit, 100)))}

    return app


class _Unauthorized(Exception):
    pass


class _ClientGone(Exception):
    """Raised into the generation of a stream whose client has closed it."""


def _version() -> str:
    from kalmkg import __version__

    return __version__


def _last_question(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):  # content parts: the text ones
                content = " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            if content and content.strip():
                return content
            break
    raise KalmkgError("no question: the last user message is empty or missing")


def _ask_config(request: AskOptions, **generation: Any):
    from kalmkg.qa.ask import AskConfig

    return AskConfig(hops=request.hops, max_facts=request.max_facts, no_context=request.no_context,
                     predict=request.predict, min_precision=request.min_precision, paraphrase=request.paraphrase,
                     **generation)


def _citations(answer) -> str:
    from kalmkg.prompts import context_lines

    lines = context_lines(answer.facts, answer.descriptions)
    return "\n\nFacts:\n" + "\n".join(lines) if lines else ""


def _with_citations(answer) -> str:
    return answer.text + _citations(answer)


def _chat_events(service: Service, question: str, config, completion_id: str, created: int) -> Iterator[str]:
    """Server-sent events of a chat completion: the answer's pieces as the model writes them, the
    citations, then a last chunk with the finish reason and the structured answer. The answer is made
    in a worker thread (which waits for the model's lock); this generator relays what it says."""
    pieces: queue.Queue = queue.Queue()
    done = object()
    outcome: dict[str, Any] = {}
    gone = threading.Event()  # the client closed the stream: stop generating, free the model

    def relay(piece: str) -> None:
        if gone.is_set():
            raise _ClientGone()
        pieces.put(piece)

    def work() -> None:
        try:
            outcome["answer"] = service.ask(question, config, on_token=relay)
        except _ClientGone:
            pass
        except Exception as exc:  # noqa: BLE001 - said to the client as an error event
            outcome["error"] = exc
        finally:
            pieces.put(done)

    threading.Thread(target=work, name="kalmkg-answer", daemon=True).start()

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": service.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := pieces.get()) is not done:
            yield chunk({"content": piece})
    finally:  # also when the client went away (the generator is closed)
        gone.set()
    if "error" in outcome:
        exc = outcome["error"]
        message = str(exc) if isinstance(exc, KalmkgError) else f"unexpected {type(exc).__name__}: {exc}"
        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
    else:
        answer = outcome["answer"]
        citations = _citations(answer)
        if citations:
            yield chunk({"content": citations})
        yield chunk({}, "stop", kalmkg=answer.to_json())
    yield "data: [DONE]\n\n"
