"""`kalmkg train --report-to tensorboard|mlflow`: the numbers of metrics.jsonl reach those libraries (read
back through their own readers), a resumed run goes on in the same MLflow run, and a library or tracking
store that is not there is one line before any work."""

from __future__ import annotations

import json

import pytest

from kalmkg.errors import KalmkgError
from kalmkg.runs import read_metrics
from kalmkg.training.report import numbers

pytestmark = pytest.mark.slow


def settings(tiny_model, **extra):
    from kalmkg.training.config import TrainConfig

    return TrainConfig(base=str(tiny_model), batch_size=8, max_steps=4, precision="fp32", eval_limit=10,
                       eval_every=2, log_every=1, checkpoint_every=1, patience=0, **extra)


def test_a_record_becomes_named_numbers():
    step, flat = numbers({"step": 3, "epoch": 0, "loss": 2.5, "l_imp": None, "event": "x",
                          "valid": {"mrr": 0.5, "hits@10": 1.0, "count": 20}})
    assert step == 3 and flat == {"loss": 2.5, "valid/mrr": 0.5, "valid/hits@10": 1.0, "valid/count": 20.0}


def test_tensorboard_gets_the_losses_and_the_validations(sample_ws, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kalmkg.training.loop import train

    result = train(sample_ws, settings(tiny_model, report_to="tensorboard"), run_id="tb")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    records = read_metrics(result.run_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    valid = [(r["step"], r["valid"]["mrr"]) for r in records if "valid" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("valid/mrr")] == valid and len(valid) == 2


def test_mlflow_gets_params_and_metrics_and_a_resume_goes_on_in_the_same_run(sample_ws, tiny_model, tmp_path,
                                                                              monkeypatch):
    import mlflow

    from kalmkg.training.loop import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = settings(tiny_model, report_to="mlflow")
    train(sample_ws, cfg, run_id="ml", stop_after=2)  # as if killed after two steps
    folder = sample_ws.runs_dir / "ml"
    first = (folder / "mlflow_run_id").read_text().strip()
    train(sample_ws, cfg, resume="ml")
    assert (folder / "mlflow_run_id").read_text().strip() == first
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(first)
    assert run.data.params["batch_size"] == "8" and run.data.tags["kalmkg.run"] == "ml"
    history = sorted((m.step, m.value) for m in client.get_metric_history(first, "valid/mrr"))
    records = read_metrics(folder)
    assert history == sorted((r["step"], pytest.approx(r["valid"]["mrr"])) for r in records if "valid" in r)
    assert [m.step for m in client.get_metric_history(first, "valid/hits_at_10")] == [2, 4]
    assert sorted(m.step for m in client.get_metric_history(first, "loss")) == [1, 2, 3, 4]


def test_a_tracking_store_that_refuses_is_one_line_before_any_work(sample_ws, tiny_model, tmp_path, monkeypatch):
    from kalmkg.training.loop import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(KalmkgError, match="--report-to mlflow: the tracking store at file:"):
        train(sample_ws, settings(tiny_model, report_to="mlflow"), run_id="refused")
    assert not (sample_ws.runs_dir / "refused").exists()
    with pytest.raises(KalmkgError, match="unknown --report-to 'wandb'"):
        settings(tiny_model, report_to="wandb")
    assert json.dumps(numbers({"step": 1})) == "[1, {}]"
