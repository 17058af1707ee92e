"""What a command shows on stderr while the library works: one base (`Display`) and the four displays the
library's progress callbacks talk to. Rich is imported when a display is made, not when this module is."""

from __future__ import annotations

from pathlib import Path


class Display:
    """A context manager around one command's progress output. `quiet` (the command's --json) draws
    nothing; `drawn` is whether anything animated may be drawn (quiet or a pipe: no)."""

    def __init__(self, console, quiet: bool = False):
        self.console = console
        self.quiet = quiet

    @property
    def drawn(self) -> bool:
        return not self.quiet and self.console.is_terminal

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (called on leaving the `with`, also after an error)."""


class Bar(Display):
    """A rich progress bar. Subclasses give its `columns()`; by default it is drawn on terminals only and
    vanishes when done, since the command prints its own summary."""

    transient = True
    terminal_only = True

    def __init__(self, console, quiet: bool = False):
        super().__init__(console, quiet)
        from rich.progress import Progress

        hidden = quiet or (self.terminal_only and not console.is_terminal)
        self.progress = Progress(*self.columns(), console=console, disable=hidden, transient=self.transient)

    def columns(self) -> tuple:
        raise NotImplementedError

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


class IngestBar(Bar):
    """Bytes read per source, with rows and rows/s (the ingest progress protocol: start, advance, done)."""

    def __init__(self, console, quiet: bool = False):
        super().__init__(console, quiet)
        self.task = None
        self.rows = 0

    def columns(self) -> tuple:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TransferSpeedColumn

        return (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TransferSpeedColumn(), TextColumn("{task.fields[rows]:,} rows"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn())

    def start(self, source, stage: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.rows = 0
        total = source.size or None
        self.task = self.progress.add_task(f"{stage} {Path(source.name).name}", total=total, rows=0, rate="")

    def advance(self, nbytes: int = 0, rows: int = 0) -> None:
        if rows:  # bytes also come from pyarrow's reading thread: only the caller's thread writes the count
            self.rows += rows
        elapsed = self.progress.tasks[-1].elapsed or 0.0
        rate = f"{self.rows / elapsed:,.0f} rows/s" if elapsed > 0 and self.rows else ""
        self.progress.update(self.task, advance=nbytes, rows=self.rows, rate=rate)

    def done(self, result) -> None:
        pass


class TrainBar(Bar):
    """Steps with the loss terms, tau, triples/s and ETA (the training progress protocol: start, step,
    message, stop). It stays when done and is printed to pipes too: it is the record of the run."""

    transient = False
    terminal_only = False

    def __init__(self, console):
        super().__init__(console)
        self.task = None

    def columns(self) -> tuple:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        return (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[terms]}"), TimeRemainingColumn())

    def start(self, total_steps, state) -> None:
        self.task = self.progress.add_task("train", total=total_steps, completed=state.step, epoch=state.epoch,
                                           terms="")

    def step(self, state, terms, rate) -> None:
        text = f"loss {terms['loss']:.4f} exp {terms['l_exp']:.4f}"
        if terms.get("l_imp") is not None:
            text += f" imp {terms['l_imp']:.3f}"
        text += f" tau {terms['tau']:.4f} acc {terms['acc']:.2f} {rate:.1f} triples/s"
        self.progress.update(self.task, completed=state.step, epoch=state.epoch, terms=text)

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def stop(self) -> None:
        pass


class CountBar(Bar):
    """Counts (entities, queries), one line per stage: `stage(name, done, total)` is the callback."""

    def __init__(self, console, quiet: bool = False):
        super().__init__(console, quiet)
        self.tasks: dict = {}

    def columns(self) -> tuple:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())

    def stage(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)


class ExportStages(Display):
    """A line per finished stage (time and what it made), a spinner on the running one (terminals only):
    the export progress protocol (stage, stage_done, message)."""

    def __init__(self, console, quiet: bool = False):
        super().__init__(console, quiet)
        self.status = None
        self.label = ""

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def stage(self, name: str, index: int, total: int) -> None:
        self.close()
        self.label = f"[{index + 1}/{total}] {name:<8}"
        if self.drawn:
            self.status = self.console.status(f"{self.label} ...")
            self.status.start()

    def stage_done(self, name: str, seconds: float, detail: str = "") -> None:
        self.close()
        if not self.quiet:
            self.console.print(f"{self.label} {seconds:6.1f}s  {detail}", markup=False)

    def message(self, text: str) -> None:
        self.console.print(f"note: {text}", markup=False)  # stderr, so --json output stays clean
