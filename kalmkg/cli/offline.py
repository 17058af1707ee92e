"""The offline side: export (a run as a verified GGUF), ask (questions to it through llama.cpp, no torch),
serve (the same over HTTP), doctor (the environment they run in)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from kalmkg.cli.options import json_option, run_option
from kalmkg.cli.output import console, print_json
from kalmkg.cli.progress import ExportStages
from kalmkg.errors import KalmkgError
from kalmkg.store import Store


def export(
    ctx: typer.Context,
    run: Optional[str] = run_option("Run id under runs/."),
    quant: Optional[str] = typer.Option(
        None, "--quant", "-q", help="F16, Q8_0, Q6_K, Q5_K_M or Q4_K_M.",
        show_default="Q8_0 below 1B parameters, Q4_K_M above",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Output name: models/<name>.gguf.", show_default="<run>-<quant>"),
    ollama: bool = typer.Option(False, "--ollama", help="Also write models/<name>.Modelfile for `ollama create`."),
    hf: Optional[Path] = typer.Option(None, "--hf", help="Also keep the merged Hugging Face folder here (safetensors, tokenizer, chat template, model card)."),
    as_json: bool = json_option("Print the result (paths, sizes, verification) as JSON."),
) -> None:
    """Merge a run's LoRA into its base and write a quantized GGUF for llama.cpp, verified against torch.

    Stages: merge (float32), save (HF folder), convert (llama.cpp's converter),
    quantize (llama.cpp), verify (llama.cpp vs torch: last-token embeddings,
    cosine >= 0.99 for F16/Q8_0, looser for K-quants; a greedy continuation).
    Writes models/<name>.gguf (with run, graph fingerprint and pooling in its
    metadata) and models/<name>.json; a failed stage leaves neither behind.

    \b
    Examples:
      kalmkg export
      kalmkg export --quant Q4_K_M --ollama
      kalmkg export --run 20250101-120000-smollm2-135m --quant F16 --name smollm-kg
      kalmkg export --hf exported-hf/      # also the merged folder, for vLLM, TGI, transformers
    """
    from kalmkg.export.pipeline import export_run

    with ctx.obj.writer("export"), ExportStages(console(stderr=True), quiet=as_json) as stages:
        result = export_run(ctx.obj, run, quant, name, ollama, stages, hf=hf)
    v = result.verification
    if as_json:
        print_json({"name": result.name, "path": str(result.path), "metadata": str(result.metadata_path),
                    "modelfile": str(result.modelfile) if result.modelfile else None, "run_id": result.run_id,
                    "quant": result.quant, "n_params": result.n_params, "size_bytes": result.size_bytes,
                    "replaced": result.replaced, "seconds": result.seconds, "verification": v.as_dict(),
                    "hf": str(hf) if hf is not None else None})
        return
    out = console()
    greedy = ("same greedy continuation" if v.greedy_match else
              "greedy continuation differs after the first token" if v.first_token_match else
              "greedy first token differs (a near tie)")
    out.print(f"run {result.run_id} -> {result.path} ({result.quant}, {result.size_bytes / 1e6:,.1f} MB"
              f"{', replaced the previous file' if result.replaced else ''})")
    out.print(f"verified: min cosine {v.min_cosine:.5f} over {v.texts} texts (needs >= {v.threshold}), {greedy}")
    if result.modelfile is not None:
        out.print(f"ollama: cd {result.modelfile.parent} && ollama create {result.name} -f {result.modelfile.name}")
    if hf is not None:
        out.print(f"Hugging Face folder (merged, with a model card) -> {hf}", soft_wrap=True)


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="A question in plain words; quote it for the shell."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="A .gguf file, a name under models/, or smollm2-135m (the untrained embedded base).",
        show_default="the newest `kalmkg export`",
    ),
    hops: int = typer.Option(2, "--hops", help="How far from the entities the question names to look: 1 or 2."),
    max_facts: int = typer.Option(8, "--max-facts", help="Facts given to the model."),
    no_context: bool = typer.Option(False, "--no-context", help="Ask the model alone, without facts (what training put into its weights)."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy (the same answer every time)."),
    max_tokens: int = typer.Option(96, "--max-tokens", help="Longest answer, in tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (with --temperature > 0)."),
    predict: bool = typer.Option(True, "--predict/--no-predict", help="When no fact answers a clear question, let the run's link predictor answer, said as a prediction."),
    min_precision: float = typer.Option(0.5, "--min-precision", help="Say a prediction only where held-out predictions scoring as high were right this often (0-1]."),
    paraphrase: bool = typer.Option(True, "--paraphrase/--no-paraphrase", help="When the question's words name no relation (\"money\" for currency), let the model read which one it asks (about a second on 2 cores)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads.", show_default="one per physical core this process may use"),
    as_json: bool = json_option("Print answer, facts, linked entities and timings as JSON."),
) -> None:
    """Answer QUESTION from the graph, offline, with an exported GGUF through llama.cpp.

    The entities the question names are linked to the graph (labels, then fuzzy
    matches), the facts around them (1-2 hops) are ranked by relevance to the
    question, and the best ones go into the model's chat template as numbered
    facts. The answer streams, then the facts it was given are listed as citations.
    A question that names nothing in the graph gets "Nothing in the graph
    matches" instead of an invented answer. When no fact answers a question
    that names one entity and one relation clearly, the run's link predictor may
    answer, said as "Not in the graph; predicted: X" with the precision such
    predictions had on held-out triples (`kalmkg train` calibrates it). No torch
    is imported.

    \b
    Examples:
      kalmkg ask "What is the nationality of Marie Curie's spouse?"
      kalmkg ask "Who founded Apple?" --hops 1 --max-facts 4
      kalmkg ask "Who was Marie Curie married to?" --no-context      # the model alone
      kalmkg ask "Where was Bill Gates born?" --model smollm2-135m   # the untrained base
      kalmkg ask "Which countries border Germany?" --json | jq .facts
      kalmkg ask "Who is the spouse of Angela Merkel?" --min-precision 0.8   # predictions said more rarely
    """
    from kalmkg.prompts import context_lines
    from kalmkg.qa.ask import AskConfig, Asker

    config = AskConfig(hops=hops, max_facts=max_facts, no_context=no_context, temperature=temperature,
                       max_tokens=max_tokens, seed=seed, predict=predict, min_precision=min_precision,
                       paraphrase=paraphrase)  # checks the options before a model is loaded
    if threads is not None and threads < 1:
        raise KalmkgError("--threads must be at least 1")
    if not question.strip():
        raise KalmkgError("an empty question")
    with Store.open(ctx.obj):  # a missing graph fails before a model is loaded
        pass
    t0 = time.perf_counter()
    asker = Asker(ctx.obj, model, n_threads=threads, embed=not no_context)
    load_s = time.perf_counter() - t0

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    answer = asker.ask(question, config, on_token=None if as_json else stream)
    answer.seconds["load"] = round(load_s, 4)
    if as_json:
        print_json(answer.to_json())
        return
    sys.stdout.write("\n")
    if answer.facts or answer.descriptions:
        sys.stdout.write("\nFacts given to the model:\n")
        for line in context_lines(answer.facts, answer.descriptions):
            sys.stdout.write(f"  {line}\n")
    sys.stdout.flush()  # the answer and facts before the status line on stderr
    links = ", ".join(f"{lk.label} ({lk.match})" for lk in answer.links) or "none"
    ttft = answer.seconds.get("first_token")
    timing = f"; load {load_s:.1f} s, retrieve {answer.seconds['retrieve']:.2f} s"
    timing += f", read the relation {answer.seconds['read']:.2f} s" if "read" in answer.seconds else ""
    timing += f", first token {ttft:.2f} s" if ttft is not None else ""
    timing += f", predict {answer.seconds['predict']:.2f} s" if "predict" in answer.seconds else ""
    mode = "no context" if no_context else f"linked: {links}"
    for note in answer.notes:
        console(stderr=True).print(note, style="dim", markup=False, soft_wrap=True)
    console(stderr=True).print(f"{mode}; model {answer.model}{timing}", style="dim", markup=False, soft_wrap=True)


def doctor(
    ctx: typer.Context,
    as_json: bool = json_option("Print the report as JSON."),
    retest: bool = typer.Option(False, "--retest", help="Run llama.cpp's self-test again instead of using the cached verdict."),
) -> None:
    """Print the environment for a bug report: versions, CPU, torch and its
    device, the llama.cpp build (features, CUDA) and its self-test, the
    workspace, cache folders and free disk.

    Exits 1 with one error line when llama.cpp fails its self-test (e.g. built
    for instructions this CPU does not grant); the line says how to rebuild.

    \b
    Examples:
      kalmkg doctor
      kalmkg doctor --json > environment.json
    """
    from kalmkg.doctor import format_report, problem, report

    data = report(ctx.obj, retest=retest)
    if as_json:
        print_json(data)
    else:
        sys.stdout.write(format_report(data) + "\n")
    sys.stdout.flush()
    failure = problem(data)
    if failure:
        raise KalmkgError(failure)


def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A .gguf file, a name under models/, or smollm2-135m (the untrained embedded base).",
        show_default="the newest `kalmkg export`",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; set --api-key then)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KALMKG_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1 (the openai client's api_key)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads.", show_default="one per physical core this process may use"),
) -> None:
    """Serve the graph and its model over HTTP: OpenAI-compatible and kalmkg's own endpoints.

    \b
    POST /v1/chat/completions  a question (the last user message) answered from the graph, as
                               `kalmkg ask` answers it; stream=true streams it (SSE); the answer's
                               entity, path and cited facts are in the response's `kalmkg` field
    POST /v1/embeddings        the run's KaLM vectors of texts
    GET  /v1/models            the model served
    POST /v1/ask, /v1/predict  `kalmkg ask` / `kalmkg predict` as JSON
    GET  /v1/entities?q=NAME   `kalmkg entities`
    GET  /health, /docs        status; the API's interactive documentation
    One model is held in memory; requests are answered one at a time by it (the others queue).

    \b
    Examples:
      kalmkg serve
      kalmkg serve --port 8080 --api-key secret
      python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');
                 print(c.chat.completions.create(model='kalmkg', messages=[{'role': 'user',
                 'content': 'Who founded Apple?'}]).choices[0].message.content)"
    """
    import socket

    import uvicorn

    from kalmkg.serve.app import create_app
    from kalmkg.serve.service import Service

    if not 0 <= port < 65536:
        raise KalmkgError("--port must be between 0 (any free port) and 65535")
    if threads is not None and threads < 1:
        raise KalmkgError("--threads must be at least 1")
    with Store.open(ctx.obj):  # a missing graph fails before a model is loaded
        pass
    # the socket bound here, before the model loads: a port in use is one line, and --port 0 gets a free one
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise KalmkgError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    service = Service(ctx.obj, model, n_threads=threads)
    app = create_app(service, api_key=api_key or None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"
    console(stderr=True).print(f"serving {service.model} from {ctx.obj.root} on {url} (OpenAI base_url {url}/v1"
                               f"{', API key required' if api_key else ''}); Ctrl-C stops",
                               soft_wrap=True, markup=False)
    server.run(sockets=[sock])
