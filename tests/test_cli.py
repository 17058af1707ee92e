"""The `kalmkg` command line: exit codes and one-line errors (in real subprocesses), the busy workspace,
workspace selection, and the ingest summary."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers_graph import (
    PREFIXES, SAMPLE_TTL, assert_one_line_error, cli_env, contents, dump, ingest_into, run_kalmkg, write,
)
from kalmkg.cli.app import app
from kalmkg.errors import KalmkgError
from kalmkg.store import Store
from kalmkg.workspace import ENV_VAR, Workspace


def cli(*args, env: dict | None = None):
    """Run the Typer app in this process (exceptions propagate); returns click's Result."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)
    assert result.exit_code == 0, result.output
    return result


def _stats(ws: Path) -> dict:
    return json.loads(cli("-w", ws, "stats", "--json").stdout)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line `error: ...` on stderr, exit 1, no traceback
# ---------------------------------------------------------------------------------------------------------
BAD_FILES = {
    "turtle_syntax": ("bad.ttl", PREFIXES + "ex:a ex:p ex:b .\nex:a ex:p .\n", ["bad.ttl", "line 9", "syntax error"]),
    "ntriples_syntax": ("bad.nt", "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n<http://x.org/a> .\n",
                        ["bad.nt", "line 2", "syntax error"]),
    "non_utf8": ("latin1.tsv", b"a\tr\tb\nc\tr\td\n\xe9t\xe9\tr\tb\n", ["latin1.tsv:3", "not valid UTF-8"]),
    "empty": ("empty.tsv", b"", ["empty.tsv", "empty"]),  # an empty RDF file is a valid, empty graph
    "four_columns": ("four.tsv", "a\tr\tb\nc\tr\td\te\n", ["four.tsv:2", "expected 3", "found 4"]),
    "unknown_extension": ("graph.dat", "a\tr\tb\n", ["graph.dat", "--format", "turtle", "ntriples", "jsonld"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_error(tmp_path, case):
    name, content, fragments = BAD_FILES[case]
    path = write(tmp_path / name, content)
    proc = run_kalmkg("-w", tmp_path / "ws", "ingest", path, cwd=tmp_path)
    assert_one_line_error(proc, *fragments)


def test_ingest_error_stderr_is_exactly_one_line(tmp_path):
    path = write(tmp_path / "empty.tsv", b"")
    proc = run_kalmkg("-w", tmp_path / "ws", "ingest", path, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {path}: file is empty\n"


def test_unknown_format_lists_supported_formats(tmp_path):
    path = write(tmp_path / "g.ttl", PREFIXES + "ex:a ex:p ex:b .\n")
    proc = run_kalmkg("-w", tmp_path / "ws", "ingest", "--format", "yaml", path, cwd=tmp_path)
    line = assert_one_line_error(proc, "unknown format 'yaml'")
    for fmt in ("turtle", "ntriples", "nquads", "trig", "rdfxml", "jsonld", "tsv", "csv"):
        assert fmt in line


def test_missing_path_is_one_line_error(tmp_path):
    proc = run_kalmkg("-w", tmp_path / "ws", "ingest", tmp_path / "nope.ttl", cwd=tmp_path)
    assert_one_line_error(proc, "nope.ttl", "no such file")


def test_unknown_split_is_one_line_error(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tr\tb\n")
    proc = run_kalmkg("-w", tmp_path / "ws", "ingest", "--split", "dev", path, cwd=tmp_path)
    assert_one_line_error(proc, "unknown split 'dev'")


@pytest.mark.parametrize("args", [["stats"], ["stats", "--json"], ["entities", "Paris"], ["split"],
                                  ["ask", "Where was Bill Gates born?"]])
def test_commands_on_a_workspace_without_a_graph(tmp_path, args):
    proc = run_kalmkg("-w", tmp_path / "empty_ws", *args, cwd=tmp_path)
    assert_one_line_error(proc, "no graph in workspace", "kalmkg ingest")
    assert not (tmp_path / "empty_ws").exists()


def test_entities_without_a_match_is_one_line_error(tmp_path):
    ingest_into(tmp_path / "ws", [write(tmp_path / "t.tsv", "a\tr\tb\n")])
    proc = run_kalmkg("-w", tmp_path / "ws", "entities", "zzqqxxj", cwd=tmp_path)
    assert_one_line_error(proc, "no entity matches 'zzqqxxj'")
    assert json.loads(cli("-w", tmp_path / "ws", "entities", "zzqqxxj", "--json").stdout) == []


def test_split_with_bad_fractions_is_one_line_error(tmp_path):
    ingest_into(tmp_path / "ws", [write(tmp_path / "t.tsv", "a\tr\tb\n")])
    before = dump(tmp_path / "ws")
    proc = run_kalmkg("-w", tmp_path / "ws", "split", "--valid", "0.6", "--test", "0.5", cwd=tmp_path)
    assert_one_line_error(proc, "--valid and --test")
    for args in (["--valid", "-0.1"], ["--test", "1"]):
        with pytest.raises(KalmkgError, match="--valid and --test"):
            CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "split", *args], catch_exceptions=False)
    assert dump(tmp_path / "ws") == before


def test_failed_multi_file_ingest_via_cli_leaves_the_store_as_it_was(tmp_path):
    ws = tmp_path / "ws"
    ingest_into(ws, [SAMPLE_TTL])
    before = dump(ws)
    good1 = write(tmp_path / "good1.ttl", PREFIXES + "ex:g1 ex:p ex:g2 .\n")
    bad = write(tmp_path / "bad.tsv", "a\tr\tb\nc\tr\n")
    good2 = write(tmp_path / "good2.nt", "<http://x.org/g3> <http://x.org/p> <http://x.org/g4> .\n")
    proc = run_kalmkg("-w", ws, "ingest", good1, bad, good2, cwd=tmp_path)
    assert_one_line_error(proc, "bad.tsv:2")
    assert dump(ws) == before
    assert _stats(ws)["triples"] == 304


# ---------------------------------------------------------------------------------------------------------
# Busy workspace
# ---------------------------------------------------------------------------------------------------------
def test_one_writing_command_at_a_time_and_readers_go_on(tiny_run_ws, tmp_path):
    """While one command writes the workspace (its writer lock held), every other writing command is
    refused in one line that names the writer; readers keep working; a holder killed by -9 lets go."""
    import signal

    ws = tiny_run_ws
    extra = write(tmp_path / "extra.tsv", "x\tr\ty\n")
    with ws.writer("train"):
        for args in (["ingest", extra], ["split", "--force"], ["train", "--max-steps", "1"], ["embed"],
                     ["export", "-q", "f16"]):
            proc = run_kalmkg("-w", ws.root, *args, cwd=tmp_path)
            assert_one_line_error(proc, "workspace is busy: `kalmkg train` (pid", "is writing")
        for args in (["stats"], ["entities", "Paris"]):
            assert run_kalmkg("-w", ws.root, *args, cwd=tmp_path).returncode == 0, args
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; from kalmkg.workspace import Workspace\n"
                               f"with Workspace(Path({str(ws.root)!r})).writer('ingest'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert_one_line_error(run_kalmkg("-w", ws.root, "ingest", extra, cwd=tmp_path), "`kalmkg ingest`")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_kalmkg("-w", ws.root, "ingest", extra, cwd=tmp_path).returncode == 0


def test_readers_see_the_old_graph_while_an_edit_runs(tmp_path):
    """Ingest and split write a copy of the store (Store.edit): other processes read the graph as it was
    until the edit ends, then the new one; an edit that fails leaves the store as it was."""
    ws = Workspace(tmp_path / "ws")
    ingest_into(ws.root, [SAMPLE_TTL])
    before = contents(ws.root)
    with Store.edit(ws) as store:
        store.con.execute("UPDATE triples SET split = 'test' WHERE head = (SELECT min(head) FROM triples)")
        store.con.execute("INSERT INTO meta VALUES ('edited', '1')")
        for args in (["stats", "--json"], ["entities", "Paris", "--json"]):
            proc = run_kalmkg("-w", ws.root, *args, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
        assert json.loads(run_kalmkg("-w", ws.root, "stats", "--json", cwd=tmp_path).stdout)["splits"]["test"] == 0
    assert _stats(ws.root)["splits"]["test"] > 0
    with pytest.raises(KalmkgError):
        with Store.edit(ws) as store:
            store.con.execute("DELETE FROM triples")
            raise KalmkgError("a refused file")
    assert _stats(ws.root)["triples"] == 304
    assert contents(ws.root)["entities"] == before["entities"]
    assert not [p.name for p in ws.root.iterdir() if p.name.startswith(".kg.edit.")]  # no staging left


def test_stats_works_while_a_cli_ingest_writes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ingest_into(ws.root, [SAMPLE_TTL])
    big = tmp_path / "big.tsv"
    big.write_text("".join(f"e{i}\tr{i % 7}\te{i + 1}\n" for i in range(400_000)))
    ingest = subprocess.Popen([sys.executable, "-m", "kalmkg", "-w", str(ws.root), "ingest", str(big)],
                              env=cli_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen_during = []
    while ingest.poll() is None:
        if any(p.name.startswith(".kg.edit.") for p in ws.root.iterdir()):
            proc = run_kalmkg("-w", ws.root, "stats", "--json", cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr  # not "workspace is busy"
            if ingest.poll() is None:
                seen_during.append(json.loads(proc.stdout)["triples"])
    assert ingest.returncode == 0, ingest.stderr.read()
    # the old graph while the ingest writes; the new one once it is swapped in (the process then still prints)
    assert seen_during and seen_during[0] == 304 and set(seen_during) <= {304, 304 + 400_000}
    assert _stats(ws.root)["triples"] == 304 + 400_000


def test_second_process_gets_workspace_is_busy(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ingest_into(ws.root, [SAMPLE_TTL])
    extra = write(tmp_path / "extra.tsv", "x\tr\ty\n")
    with Store.open(ws, write=True) as store:
        before = store.con.execute("SELECT count(*) FROM triples").fetchone()
        for args in (["ingest", extra], ["stats"], ["ask", "Where was Bill Gates born?"]):  # a writer, readers
            proc = run_kalmkg("-w", ws.root, *args, cwd=tmp_path)
            assert_one_line_error(proc, "workspace is busy")
        # the held store is intact and still usable
        assert store.con.execute("SELECT count(*) FROM triples").fetchone() == before == (304,)
        store.con.execute("INSERT INTO meta VALUES ('still_writable', '1')")
    # once released, the same ingest goes through
    cli("-w", ws.root, "ingest", "--json", extra)
    snap = contents(ws.root)
    assert len(snap["triples"]) == 305 and ("x", "r", "y", "train") in snap["triples"]


# ---------------------------------------------------------------------------------------------------------
# Successful runs
# ---------------------------------------------------------------------------------------------------------
def test_ingest_stats_entities_end_to_end(tmp_path):
    ws = tmp_path / "ws"
    proc = run_kalmkg("-w", ws, "ingest", SAMPLE_TTL, cwd=tmp_path, env=cli_env(COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    assert "world.ttl" in proc.stdout and "304" in proc.stdout and "144" in proc.stdout
    assert _stats(ws)["triples"] == 304
    again = cli("-w", ws, "ingest", SAMPLE_TTL, env={"COLUMNS": "200"})
    assert "skipped" in again.stdout
    found = cli("-w", ws, "entities", "Marie Cury", "--json")
    assert json.loads(found.stdout)[0]["label"] == "Marie Curie"


def test_ingest_json_summary(tmp_path):
    ws = tmp_path / "ws"
    tsv = write(tmp_path / "t.tsv", "a\tr\tb\nb\tr\tc\n")
    result = CliRunner().invoke(app, ["-w", str(ws), "ingest", "--json", str(SAMPLE_TTL), str(tsv), str(tsv)],
                                catch_exceptions=False)
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert [(s["format"], s["skipped"], s["triples"], s["entities"]) for s in summary] == \
        [("turtle", False, 304, 144), ("tsv", False, 2, 3), ("tsv", True, 0, 0)]
    assert summary[0]["relations"] == 16 and summary[0]["attributes"] == 51
    assert summary[0]["source"] == str(SAMPLE_TTL)


def test_ingest_lang_option(tmp_path):
    path = write(tmp_path / "l.ttl", PREFIXES + 'ex:a rdfs:label "Chat"@fr, "Cat"@en ; ex:p ex:b .\n')
    result = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "ingest", "--lang", "fr", "--json", str(path)],
                                catch_exceptions=False)
    assert result.exit_code == 0
    assert contents(tmp_path / "ws")["entities"]["http://x.org/a"][0] == "Chat"


def test_ingest_format_option_via_cli(tmp_path):
    path = write(tmp_path / "graph.data", "<http://x.org/a> <http://x.org/p> <http://x.org/b> .\n")
    cli("-w", tmp_path / "ws", "ingest", "-f", "nt", path)
    assert _stats(tmp_path / "ws")["triples"] == 1


def test_workspace_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = write(tmp_path / "t.tsv", "a\tr\tb\n")
    env = {ENV_VAR: str(tmp_path / "env_ws")}
    cli("ingest", "--json", path, env=env)
    assert (tmp_path / "env_ws" / "kg.duckdb").is_file()
    assert not (tmp_path / ".kalmkg").exists()
    assert json.loads(cli("stats", "--json", env=env).stdout)["triples"] == 1
    # -w wins over the variable
    cli("-w", tmp_path / "flag_ws", "ingest", "--json", path, env=env)
    assert (tmp_path / "flag_ws" / "kg.duckdb").is_file()


def test_default_workspace_is_dot_kalmkg_in_the_current_folder(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tr\tb\n")
    proc = run_kalmkg("ingest", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ".kalmkg" / "kg.duckdb").is_file()
    assert _stats(tmp_path / ".kalmkg")["triples"] == 1


def test_help_lists_the_commands(tmp_path):
    proc = run_kalmkg("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("ingest", "stats", "entities", "split", "--workspace"):
        assert command in proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["ask"], ["Missing argument", "kalmkg ask --help"]),
    (["stats", "--top", "many"], ["Invalid value for '--top'", "kalmkg stats --help"]),
    (["predict", "Paris", "capital_of"], ["Missing argument", "kalmkg predict --help"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
])
def test_usage_errors_are_one_line_and_exit_1(tmp_path, args, fragments):
    assert_one_line_error(run_kalmkg(*args, cwd=tmp_path), *fragments)


def test_bare_kalmkg_prints_the_help(tmp_path):
    proc = run_kalmkg(cwd=tmp_path)
    assert proc.returncode == 2 and "Usage:" in proc.stdout and "ingest" in proc.stdout


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / ("kalmkg.exe" if os.name == "nt" else "kalmkg")
    assert script.is_file(), f"console script missing: {script} (pip install -e .)"
    import subprocess

    proc = subprocess.run([str(script), "ingest", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env=cli_env(), timeout=60)
    assert proc.returncode == 0 and "--format" in proc.stdout


HEAVY = ["torch", "transformers", "peft", "lancedb", "duckdb", "numpy", "pyarrow", "llama_cpp", "rdflib",
         "pyoxigraph"]


@pytest.mark.parametrize("run", ["import kalmkg.cli.app",
                                 "from kalmkg.cli.app import main; sys.argv = ['kalmkg', 'train', '--help']\n"
                                 "try:\n    main()\nexcept SystemExit:\n    pass"])
def test_cli_import_does_not_load_heavy_modules(tmp_path, run):
    """`kalmkg --help` must stay fast: importing the CLI (every command module) and printing a command's help
    load no store, RDF, Arrow or ML library."""
    import subprocess

    code = f"import sys\n{run}\nsys.stderr.write('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY="


# ---------------------------------------------------------------------------------------------------------
# `kalmkg train`'s options are TrainConfig's fields
# ---------------------------------------------------------------------------------------------------------
def _train_options() -> dict:
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    return {opt: param for param in command.params for opt in param.opts}


def test_every_train_config_field_is_a_train_option_with_help():
    import dataclasses

    from kalmkg.cli.options import option_name
    from kalmkg.training.config import TrainConfig

    options = _train_options()
    for field in dataclasses.fields(TrainConfig):
        param = options.get(option_name(field.name))
        assert param is not None, f"no --{field.name} option"
        assert param.help and param.help == field.metadata["help"], field.name
        default = ",".join(field.default) if isinstance(field.default, tuple) else field.default
        assert param.default == default, field.name
        if isinstance(field.default, bool):  # --x/--no-x either way: both can override a --config file
            assert param.secondary_opts == ["--no-" + option_name(field.name)[2:]], field.name
    # the options about the run itself stay, and --base keeps its short name
    for name in ("--run-name", "--resume", "--embed", "--dry-run", "-b"):
        assert name in options


def test_train_options_become_the_config(tmp_path, monkeypatch):
    """The Makefile demo's options (and a list, a --no- flag) reach train() as one TrainConfig."""
    import kalmkg.training.loop as loop
    from kalmkg.training.config import TrainConfig

    calls = []
    monkeypatch.setattr(loop, "train", lambda workspace, cfg, **kw: calls.append((cfg, kw)))
    cli("-w", tmp_path / "ws", "train", "--dry-run")
    cli("-w", tmp_path / "ws", "train", "--max-steps", "40", "--batch-size", "16", "--lr", "1e-3",
        "--max-entity-tokens", "16", "--lora-layers", "8", "--self-negatives", "--eval-every", "20",
        "--eval-limit", "30", "--run-name", "demo", "--no-bucket", "--lora-targets", "q_proj, v_proj",
        "-b", "some/model", "--structure", "none", "--structure-dim", "50", "--dry-run")
    (default, kw), (given, kw2) = calls
    assert default == TrainConfig() and kw["run_id"] is None
    assert given == TrainConfig(max_steps=40, batch_size=16, lr=1e-3, max_entity_tokens=16, lora_layers=8,
                                self_negatives=True, eval_every=20, eval_limit=30, bucket=False,
                                lora_targets=("q_proj", "v_proj"), base="some/model", structure="none",
                                structure_dim=50)
    assert kw2["run_id"] == "demo" and kw2["dry_run"] is not None


@pytest.mark.parametrize("args, message", [
    (["--temperature", "2"], "--temperature must be in [0.001, 1]"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--structure", "rotate"], "unknown structure 'rotate'; use complex or none"),
    (["--structure-minutes", "-1"], "--structure-minutes must be 0 (no cap) or more"),
])
def test_bad_train_option_is_one_line_before_the_graph_or_a_model(tmp_path, args, message):
    proc = run_kalmkg("-w", tmp_path / "no_graph", "train", *args, cwd=tmp_path)
    assert_one_line_error(proc, message)  # not "no graph in workspace": the options are checked first


@dataclasses.dataclass
class _Toy:
    name: str = dataclasses.field(default="x", metadata={"help": "A name.", "group": "G"})
    flag: bool = dataclasses.field(default=False, metadata={"help": "A flag."})
    keep: bool = dataclasses.field(default=True, metadata={"help": "On unless --no-keep."})
    items: tuple[str, ...] = dataclasses.field(default=("a", "b"), metadata={"help": "Items."})


def test_config_options_turns_fields_into_options_and_back():
    import typer

    from kalmkg.cli.options import config_options

    got = []

    @config_options(_Toy)
    def toy(label: str = typer.Option("l", "--label"), config: _Toy = None, after: int = typer.Option(0)):
        got.append((label, config, after))

    toy_app = typer.Typer()
    toy_app.command()(toy)
    toy_app.command("other")(lambda: None)  # a group, so the command is called by name
    result = CliRunner().invoke(toy_app, ["toy", "--label", "L", "--flag", "--no-keep", "--items", "c,,d ",
                                          "--name", "n"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert got == [("L", _Toy(name="n", flag=True, keep=False, items=("c", "d")), 0)]
    # the fields take the place of the `config` parameter, in their order
    assert list(inspect.signature(toy).parameters) == ["label", "name", "flag", "keep", "items", "after"]


def test_config_options_refuses_what_it_cannot_map():
    from kalmkg.cli.options import config_options

    @dataclasses.dataclass
    class Nested:
        sizes: tuple[int, ...] = (1,)

    with pytest.raises(TypeError, match="tuple"):
        config_options(Nested)(lambda config: None)
    with pytest.raises(TypeError, match="also fields"):
        config_options(_Toy)(lambda name, config: None)
    with pytest.raises(TypeError, match="no parameter 'config'"):
        config_options(_Toy)(lambda cfg: None)


# ---------------------------------------------------------------------------------------------------------
# main's last resort: a closed pipe, Ctrl-C, an unexpected exception
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["stats", "--json"], ["stats"]])
def test_a_closed_pipe_ends_quietly(tmp_path, args):
    """`kalmkg --help | head -1` and friends: no traceback, nothing on stderr."""
    import subprocess

    ingest_into(tmp_path / "ws", [write(tmp_path / "t.tsv", "a\tr\tb\n")])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "kalmkg", "-w", str(tmp_path / "ws"), *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), timeout=60, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 1


RAISING_STORE = """
import sys
from kalmkg.cli.app import main
from kalmkg.store import Store

def raising(*args, **kwargs):
    raise {exception}

Store.open = raising
sys.argv = ["kalmkg", *sys.argv[1:]]
main()
"""


def _stats_raising(tmp_path, exception: str, *options: str, **env):
    import subprocess

    code = RAISING_STORE.format(exception=exception)
    return subprocess.run([sys.executable, "-c", code, *options, "-w", str(tmp_path / "ws"), "stats"], capture_output=True,
                          text=True, env=cli_env(**env), timeout=60, cwd=tmp_path)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    proc = _stats_raising(tmp_path, "KeyboardInterrupt")
    assert proc.returncode == 130 and proc.stderr == "interrupted\n"


def test_an_unexpected_exception_is_one_line_unless_debugging(tmp_path):
    proc = _stats_raising(tmp_path, "RuntimeError('boom\\n  in two lines')")
    assert_one_line_error(proc, "unexpected RuntimeError: boom in two lines", "KALMKG_DEBUG=1")
    debug = _stats_raising(tmp_path, "RuntimeError('boom')", KALMKG_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "raising" in debug.stderr
    assert debug.stderr.splitlines()[-1] == "error: unexpected RuntimeError: boom"
    flag = _stats_raising(tmp_path, "RuntimeError('boom')", "--debug")
    assert flag.returncode == 1 and "Traceback" in flag.stderr and "raising" in flag.stderr


def test_version_and_shell_completion(tmp_path):
    from kalmkg import __version__

    proc = run_kalmkg("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"kalmkg {__version__}\n"
    completion = run_kalmkg("--show-completion", "bash", cwd=tmp_path, env=cli_env(SHELL="/bin/bash"))
    assert completion.returncode == 0 and "complete" in completion.stdout and "kalmkg" in completion.stdout
    for command in ("ingest", "runs", "sql", "dump", "serve"):
        assert command in run_kalmkg("--help", cwd=tmp_path, env=cli_env(COLUMNS="200")).stdout


def test_exit_code_for_each_kind_of_exception(capsys):
    import typer

    from kalmkg.cli.app import exit_code_for, one_line

    assert exit_code_for(KalmkgError("no graph")) == 1
    assert exit_code_for(KeyboardInterrupt()) == 130
    assert exit_code_for(typer.Abort()) == 130
    assert exit_code_for(ValueError()) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: no graph", "interrupted", "interrupted",
        "error: unexpected ValueError (run with KALMKG_DEBUG=1 for the traceback)"]
    assert one_line(OSError("a\n b\tc")) == "OSError: a b c"


def test_the_cli_silences_library_advice_that_would_land_in_its_tables(monkeypatch):
    import logging
    import warnings

    from kalmkg.cli.app import _quiet_libraries

    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
        monkeypatch.delenv(name)
    logger = logging.getLogger("bitsandbytes")
    monkeypatch.setattr(logger, "level", logger.level)
    with warnings.catch_warnings():
        _quiet_libraries()
    # bitsandbytes, imported by peft whenever installed, warns about an optional kernel package on every
    # AVX512-BF16 CPU: it printed between `predict`'s command and its table in `make demo`
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= logging.ERROR
