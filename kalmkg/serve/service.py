"""What `kalmkg serve` keeps warm: one GGUF through llama.cpp (chat, embeddings, the link predictor's
queries), the workspace's graph store, and a lock. A llama.cpp context holds one sequence's state at a
time, so every call into it takes the lock: concurrent requests queue there instead of corrupting each
other's KV cache. The store is opened per request (read-only, cheap), so an ingest meanwhile is seen by
the next request's retrieval; the entity index and the predictor's tables are those of the first
prediction (restart the server after `kalmkg embed` or `kalmkg export`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace


@dataclass
class Stats:
    """Counts the server reports at /v1/health."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    waiting: int = 0  # requests queued for the model now


class Service:
    """The workspace and one model, shared by every request of a server."""

    def __init__(self, workspace: Workspace, model: str | None = None, *, n_threads: int | None = None):
        from kalmkg.qa.ask import Asker

        self.workspace = workspace
        self.asker = Asker(workspace, model, n_threads=n_threads)
        self.model = self.asker.choice.name
        self.created = int(time.time())
        self.stats = Stats()
        self._lock = threading.Lock()  # the model's
        self._counting = threading.Lock()  # the stats'
        self._predictor = None

    # -------------------------------------------------------------------- the model, one caller at a time
    def _locked(self, work: Callable):
        with self._counting:
            self.stats.requests += 1
            self.stats.waiting += 1
        with self._lock:
            with self._counting:
                self.stats.waiting -= 1
            return work()

    def ask(self, question: str, config=None, on_token: Callable[[str], None] | None = None):
        """`kalmkg ask` in the server: the Answer (its text streamed to `on_token`)."""
        from kalmkg.qa.ask import AskConfig

        return self._locked(lambda: self.asker.ask(question, config or AskConfig(), on_token))

    def embed(self, texts: Sequence[str]):
        """The run's KaLM vectors of `texts` (L2-normalised last-token states of the GGUF), [n, D]."""
        if not texts:
            raise KalmkgError("no input to embed")
        return self._locked(lambda: self.asker.embedder.encode(list(texts)))

    def predict(self, head: str, relation: str, tail: str, k: int = 10, filter_known: bool = False):
        """`kalmkg predict --backend gguf` in the server: a PredictionResult."""
        from kalmkg.prediction import predict

        def work():
            if self._predictor is None:
                from kalmkg.qa.ask import open_predictor

                self._predictor = open_predictor(self.workspace, self.asker.choice, self.asker.embedder)
            return predict(self.workspace, head, relation, tail, k=k, filter_known=filter_known,
                           predictor=self._predictor)

        return self._locked(work)

    # -------------------------------------------------------------------- the graph, no model
    def entities(self, query: str, limit: int = 10) -> list[dict]:
        from kalmkg.store import Store

        with Store.open(self.workspace) as store:
            return store.find_entities(query, limit=limit)
