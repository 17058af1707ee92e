"""The public API in `kalmkg/__init__.py`: every name resolves, `import kalmkg` stays light, and the
docstring's example runs (with the tiny model as the base)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kalmkg
from conftest import SAMPLE_TTL

HEAVY = ("torch", "transformers", "peft", "lancedb", "duckdb", "pyarrow", "numpy", "llama_cpp", "rich")


def test_every_public_name_resolves_to_its_definition():
    for name in kalmkg.__all__:
        value = getattr(kalmkg, name)
        if name != "__version__":
            assert value.__module__.startswith("kalmkg"), name
    assert set(kalmkg.__all__) <= set(dir(kalmkg))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kalmkg.nope  # noqa: B018


def test_importing_kalmkg_loads_no_heavy_library():
    code = f"import kalmkg, sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docstring_example_runs(tmp_path, tiny_model):
    ws = kalmkg.Workspace.resolve(tmp_path / ".kalmkg")
    with kalmkg.Store.open(ws, create=True) as store:
        kalmkg.ingest(store, kalmkg.resolve_sources([SAMPLE_TTL]))
        kalmkg.split_store(store, 0.1, 0.1, seed=0)
    result = kalmkg.train(ws, kalmkg.TrainConfig(base=str(tiny_model), max_steps=2, batch_size=8, lr=1e-3,
                                                 precision="fp32", eval_limit=10))
    assert result.run_id
    kalmkg.embed(ws, kalmkg.load_model(ws, run=result.run_id))
    prediction = kalmkg.predict(ws, "Paris", "capital_of", "?", k=5)
    assert len(prediction.candidates) == 5
    assert "kalmkg.predict(ws, \"Paris\", \"capital_of\", \"?\", k=5)" in kalmkg.__doc__
    assert "kalmkg.TrainConfig(max_steps=40, lr=1e-3)" in kalmkg.__doc__
    assert "kalmkg.embed(ws, kalmkg.load_model(ws, run=result.run_id))" in kalmkg.__doc__
