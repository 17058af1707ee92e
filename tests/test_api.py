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


@pytest.mark.slow
def test_the_readmes_python_example_runs(tmp_path, gguf_tiny, monkeypatch):
    """The README's Python API block, as written, with the tiny model (SmolLM2's tokenizer) as the base,
    two steps instead of forty, and F16 (a random tiny model does not survive Q8_0's verification)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in (("kalmkg.TrainConfig(max_steps=40)",
                      f"kalmkg.TrainConfig(base={str(gguf_tiny)!r}, max_steps=2, batch_size=8, precision='fp32', "
                      "eval_limit=10)"),
                     ('"sample_graphs/world.ttl"', repr(str(SAMPLE_TTL))), ('"Q8_0"', '"F16"')):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    top, metrics, (text, facts) = printed
    assert len(top[0]) == 5 and 0 < metrics[0]["mrr"] <= 1
    assert all(name in text for name in ("Steve Jobs", "Steve Wozniak", "Ronald Wayne")) and len(facts) == 3
