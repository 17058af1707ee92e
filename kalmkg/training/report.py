"""Where a run's numbers go besides metrics.jsonl (`--report-to`): TensorBoard (event files in
runs/<id>/tensorboard/) or MLflow (the tracking URI MLflow itself is configured with; a resumed run goes
on in the same MLflow run, whose id the run folder keeps). Through those libraries, installed apart
(`pip install tensorboard` / `pip install mlflow`); a missing one is one line before training starts."""

from __future__ import annotations

from pathlib import Path

from kalmkg.errors import KalmkgError

MLFLOW_RUN_FILE = "mlflow_run_id"


class Reporter:
    """Nothing beyond metrics.jsonl (`--report-to none`)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def numbers(record: dict) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record as (step, flat name -> value): loss terms as they are, a validation's metrics
    under `valid/`. Non-numbers (events, None) are left out."""
    step = int(record.get("step", 0))
    flat: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return step, flat


def _library(kind: str):
    """The module `--report-to KIND` writes through; one line if it is not installed."""
    import importlib

    try:
        return importlib.import_module({"tensorboard": "tensorboard", "mlflow": "mlflow"}[kind])
    except ImportError:
        raise KalmkgError(f"--report-to {kind} needs the {kind} package: pip install {kind}") from None


class TensorBoardReporter(Reporter):
    def __init__(self, run: Path, config: dict):
        _library("tensorboard")  # torch's SummaryWriter needs it
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()), 0)

    def log(self, record: dict) -> None:
        step, flat = numbers(record)
        for name, value in flat.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowReporter(Reporter):
    def __init__(self, run: Path, config: dict):
        self.mlflow = mlflow = _library("mlflow")
        kept = run / MLFLOW_RUN_FILE
        if kept.exists():  # a resume: the same MLflow run goes on
            self.active = mlflow.start_run(run_id=kept.read_text().strip())
        else:
            self.active = mlflow.start_run(run_name=run.name)
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
            kept.write_text(self.active.info.run_id + "\n")
        mlflow.set_tag("kalmkg.run", run.name)

    def log(self, record: dict) -> None:
        step, flat = numbers(record)
        if flat:  # MLflow metric names take letters, digits and _ - . / space
            self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in flat.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def check_reporter(kind: str) -> None:
    """The library `--report-to` names is there and, for MLflow, its tracking store answers; one line if
    not (MLflow's own message, which says what to set)."""
    if kind == "none":
        return
    library = _library(kind)
    if kind != "mlflow":
        return
    try:
        library.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow's errors have no common base below Exception
        text = " ".join(str(exc).split())
        raise KalmkgError(f"--report-to mlflow: the tracking store at {library.get_tracking_uri()} refuses: "
                          f"{text[:400]}") from None


def open_reporter(kind: str, run: Path, config: dict) -> Reporter:
    if kind == "tensorboard":
        return TensorBoardReporter(run, config)
    if kind == "mlflow":
        return MLflowReporter(run, config)
    return Reporter()
