"""Generation speed: llama.cpp on the exported GGUFs vs transformers on the same merged model, and the
time `kalmkg ask` takes from the command to the first answer token.

    python bench/generate.py                 # 128 new tokens, 3 repeats, every core
    python bench/generate.py --tokens 64 --repeats 1 --threads 2
    python bench/generate.py --builds native=/tmp/lcp-native portable=/tmp/lcp-portable   # two llama.cpp builds

With --builds, only llama.cpp runs: the same GGUFs and prompt through each named llama-cpp-python install
(a `pip install --target DIR` folder), each in its own child process, the builds interleaved over
--rounds so that machine drift hits all alike; prompt tok/s and decode tok/s per build, median of rounds.

Same machine, same run, same prompt (an `ask` prompt with retrieved facts, through the model's chat
template, as token ids shared by both programs), greedy, exactly --tokens new tokens (end-of-sequence is
banned in both, as transformers' min_new_tokens does, so both produce the same count). Reported per program: prompt processing (time to the first new
token), decode tokens/s (the other tokens), and end-to-end tokens/s. The baseline is transformers
`generate` on the merged float32 model (peft `merge_and_unload` of the run, what `kalmkg export`
converts), with torch using the same number of threads. The F16 GGUF row separates llama.cpp's runtime
from quantization. Issue 5's target: >= 3x transformers' CPU speed. transformers' time to the first token
is measured by a separate 1-token `generate` call.

`kalmkg ask` latency: `python -m kalmkg ask ...` in a fresh process, from the spawn to the first byte of
the answer on stdout. "cold" is the first run after dropping the OS page cache (needs root; else the
first run, labelled so), "warm" the median of the next runs; "in-process" is a second question to an
open `Asker` (the model already loaded).

The workspace (sample graph, a 120-step KaLM run of SmolLM2-135M, Q8_0 and Q4_K_M exports) is built
once by bench/world_run.py and cached in bench/_work/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTION = "What is the nationality of Marie Curie's spouse?"


def prompt_ids(ws, tokenizer) -> list[int]:
    """The ask prompt for QUESTION (retrieved facts, no embedder: deterministic), as chat-template ids."""
    from kalmkg.prompts import build_messages
    from kalmkg.qa.ask import linked_descriptions
    from kalmkg.qa.retrieve import retrieve
    from kalmkg.store import Store

    with Store.open(ws) as store:
        found = retrieve(store, QUESTION)
    messages = build_messages(QUESTION, found.facts, linked_descriptions(found.links, 1))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def time_llama(path: Path, ids: list[int], n: int, threads: int, repeats: int, banned: list[int]) -> dict:
    import numpy as np

    import llama_cpp

    from kalmkg.llamacpp.runtime import quiet

    quiet(llama_cpp)
    llm = llama_cpp.Llama(str(path), n_ctx=max(1024, len(ids) + n + 8), n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    def ban(_, scores):  # as transformers' min_new_tokens does: end-of-sequence is never picked
        scores[banned] = -np.inf
        return scores

    runs = []
    for _ in range(repeats + 1):  # the first is a warm-up
        llm.reset()
        t0 = time.perf_counter()
        first, got = None, []
        for tok in llm.generate(ids, temp=0.0, reset=True, logits_processor=llama_cpp.LogitsProcessorList([ban])):
            if first is None:
                first = time.perf_counter() - t0
            got.append(tok)
            if len(got) == n:
                break
        runs.append((first, time.perf_counter() - t0, got))
    return summarize(runs[1:], n)


def time_transformers(model, ids: list[int], n: int, repeats: int) -> dict:
    import torch

    x = torch.tensor([ids])
    runs = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
            runs.append((first, time.perf_counter() - t0, out[0, len(ids):].tolist()))
    return summarize(runs[1:], n)


def time_llama_child() -> None:
    """--child-llama: time_llama on the JSON arguments read from stdin, result as JSON on stdout."""
    import json

    import llama_cpp

    spec = json.load(sys.stdin)
    result = time_llama(Path(spec["path"]), spec["ids"], spec["n"], spec["threads"], spec["repeats"], spec["banned"])
    info = llama_cpp.llama_print_system_info().decode().strip()
    print(json.dumps({**result, "llama_cpp": str(Path(llama_cpp.__file__).parent), "system_info": info}))


def compare_builds(builds: list[str], models: list[Path], ids: list[int], args, banned: list[int]) -> None:
    """The --builds table: each build times each model in a child whose PYTHONPATH puts the build first."""
    import json

    named = [b.split("=", 1) for b in builds]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name, folder in named:
            for model in models:
                spec = {"path": str(model), "ids": ids, "n": args.tokens, "threads": args.threads,
                        "repeats": args.repeats, "banned": banned}
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, str(ROOT)])}
                out = subprocess.run([sys.executable, __file__, "--child-llama"], input=json.dumps(spec), text=True,
                                     capture_output=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"build {name} failed on {model.name} (exit {out.returncode}): {out.stderr[-500:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if not r["llama_cpp"].startswith(str(Path(folder).resolve())):
                    raise SystemExit(f"build {name}: the child imported {r['llama_cpp']}, not {folder}")
                results.setdefault((name, model.name), []).append(r)
    print(f"\n| llama.cpp build | model | prompt tok/s ({len(ids)} tokens) | decode tok/s | vs {named[0][0]} (decode) |")
    print("|---|---|---|---|---|")
    for model in models:
        ref = statistics.median(r["decode_tps"] for r in results[(named[0][0], model.name)])
        for name, _ in named:
            rs = results[(name, model.name)]
            prompt = statistics.median(len(ids) / r["first_s"] for r in rs)
            decode = statistics.median(r["decode_tps"] for r in rs)
            print(f"| {name} | {model.name} | {prompt:,.0f} | {decode:,.1f} | {decode / ref:.2f}x |")
    for name, _ in named:
        print(f"{name}: {results[(name, models[0].name)][0]['system_info']}")
    tokens = {name: results[(name, models[0].name)][0]["tokens"] for name, _ in named}
    same = len({tuple(t) for t in tokens.values()}) == 1
    print(f"greedy tokens identical across builds ({models[0].name}): {same}")


def summarize(runs, n: int) -> dict:
    first = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {"first_s": first, "total_s": total, "decode_tps": (n - 1) / max(total - first, 1e-9),
            "e2e_tps": n / total, "tokens": runs[-1][2]}


def ask_latency(ws: Path, model: Path, threads: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "kalmkg", "-w", str(ws), "ask", QUESTION, "--model", str(model), "--max-tokens", "8",
           "--threads", str(threads)]

    def once() -> float:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        proc.stdout.read(1)
        ttft = time.perf_counter() - t0
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(err.decode())
        return ttft

    dropped = drop_caches()
    cold = once()
    warm = statistics.median(once() for _ in range(repeats))

    from kalmkg.qa.ask import AskConfig, Asker
    from kalmkg.workspace import Workspace

    asker = Asker(Workspace(ws), str(model), n_threads=threads)
    config = AskConfig(max_tokens=8)
    asker.ask(QUESTION, config)
    inproc = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stamps: list[float] = []
        asker.ask(QUESTION, config, on_token=lambda piece, t0=t0, stamps=stamps: stamps.append(time.perf_counter() - t0))
        inproc.append(stamps[0])
    return {"cold": cold, "cold_label": "cold (page cache dropped)" if dropped else "first run (cache not dropped)",
            "warm": warm, "in_process": statistics.median(inproc)}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--builds", nargs="+", metavar="NAME=DIR", help="compare llama-cpp-python installs (pip --target folders)")
    p.add_argument("--rounds", type=int, default=3, help="with --builds: interleaved rounds")
    p.add_argument("--child-llama", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_llama:
        return time_llama_child()

    import torch
    from transformers import AutoTokenizer

    from world_run import QUANTS, kalmkg, prepare

    from kalmkg.loaded import load_model
    from kalmkg.workspace import Workspace

    torch.set_num_threads(args.threads)
    root = prepare()
    ws = Workspace(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "runs" / "world" / "tokenizer")
    ids = prompt_ids(ws, tokenizer)
    print(f"prompt: {len(ids)} tokens; {args.tokens} new tokens; {args.threads} threads; median of {args.repeats}",
          file=sys.stderr)

    loaded = load_model(ws, run="world", device="cpu")
    eos = loaded.model.generation_config.eos_token_id
    banned = sorted({*([eos] if isinstance(eos, int) else eos or []), tokenizer.eos_token_id} - {None})
    if args.builds:
        return compare_builds(args.builds, [root / "models" / f"world-{q}.gguf" for q in QUANTS], ids, args, banned)
    rows = []
    for quant in ("F16", *QUANTS):
        path = root / "models" / f"world-{quant}.gguf"
        if not path.is_file():
            kalmkg(root, "export", "--run", "world", "--quant", quant, "--name", f"world-{quant}")
        r = time_llama(path, ids, args.tokens, args.threads, args.repeats, banned)
        rows.append((f"llama.cpp {quant}", path.stat().st_size, r))
    merged = loaded.model  # kalmkg loads a run with its adapter merged (peft merge_and_unload)
    merged = (merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else merged).float().eval()
    n_bytes = sum(t.numel() * t.element_size() for t in merged.parameters())  # tied embeddings once
    base = time_transformers(merged, ids, args.tokens, args.repeats)
    rows.insert(0, ("transformers fp32 (merged)", n_bytes, base))

    print("\n| program | model size | time to 1st token | decode tok/s | end-to-end tok/s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, size, r in rows:
        print(f"| {name} | {size / 1e6:,.1f} MB | {r['first_s'] * 1000:,.0f} ms | {r['decode_tps']:,.1f} | "
              f"{r['e2e_tps']:,.1f} | {r['e2e_tps'] / base['e2e_tps']:.2f}x |")
    ref = rows[0][2]["tokens"]
    for name, _, r in rows[1:]:
        same = next((i for i, (a, b) in enumerate(zip(ref, r["tokens"])) if a != b), min(len(ref), len(r["tokens"])))
        print(f"greedy continuation of {name} equals transformers' for the first {same} of {args.tokens} tokens")

    lat = ask_latency(root, root / "models" / "world-Q8_0.gguf", args.threads, args.repeats)
    print("\n| `kalmkg ask` to the first answer token (Q8_0) | seconds |")
    print("|---|---|")
    print(f"| {lat['cold_label']}, fresh process | {lat['cold']:.2f} |")
    print(f"| warm, fresh process (median) | {lat['warm']:.2f} |")
    print(f"| in-process, model loaded (median) | {lat['in_process']:.2f} |")


if __name__ == "__main__":
    main()
