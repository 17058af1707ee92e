"""What a lent GPU can do for kalmkg, checked in one call of under 5 minutes (issue 16).

    python bench/gpu_check.py --device cuda          # on the GPU machine
    python bench/gpu_check.py                        # a CPU, everything small (proves the script runs)

Each check runs on its own and is reported as a row (ok / FAILED with the first line of the error), so
one missing piece does not hide the others; the exit code is 1 if any failed:

1. environment   torch and its CUDA device (compute capability, native bf16), bitsandbytes, and whether
                 the installed llama.cpp was built with GPU offload
2. embedded      a training step of the embedded SmolLM2-135M as `kalmkg train` runs it (bf16 autocast
                 where native, the defaults for its size), on the sample graph
3. 1B random     the same step on a 1.1B-parameter Llama (TinyLlama's shape: 22 layers, 2048 wide, GQA
                 32/4) with random weights built from a local config: no hub download. The defaults for
                 its size apply (top 8 layers, lr 1e-3). On a CPU the same code on a 4-layer, 256-wide model
4. 1B 4-bit      that model again with `--quantize 4bit` (NF4, bitsandbytes): its weights' memory and step
5. llama.cpp     the embedded GGUF encoding 256 entity texts (a CPU: 32), every layer offloaded where
                 the build can

A step row gives s/step, triples/s and peak memory: on a GPU torch's peak allocation for that check
(reset before it), on a CPU the process's peak resident memory so far (it only grows).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SAMPLE = ROOT / "sample_graphs" / "world.ttl"
# TinyLlama-1.1B's shape; the small one keeps its proportions where a CPU must run it
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4)
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)


def peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()  # the previous check's model, if anything still holds it
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def check_environment(args) -> dict:
    import importlib.util

    import torch

    from kalmkg.llamacpp import runtime

    info = {"torch": torch.__version__}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        props = torch.cuda.get_device_properties(torch.device(args.device))
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", native_bf16=props.major >= 8,
                    cuda=torch.version.cuda)
    info["bitsandbytes"] = (__import__("bitsandbytes").__version__
                            if importlib.util.find_spec("bitsandbytes") else None)
    llama_cpp = runtime.load()
    info["llama_cpp_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    return info


def train_step(args, base: str, batch_size: int, **settings) -> dict:
    """A few timed KaLM steps of `base` on the sample graph (bench/train_mfu.py's set-up and timing)."""
    from train_mfu import measure, model_shape, prepare

    reset_peak(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare(SAMPLE, Path(tmp), args.device, "auto", base, **settings)
        row = measure(setup, batch_size, args.steps, model_shape(setup.model, setup.cfg))
    params = sum(p.numel() for p in setup.model.parameters())
    weights_mb = sum(p.numel() * p.element_size() for p in setup.model.parameters()) / 2**20
    del setup
    return {"batch": batch_size, "s_per_step": round(row["s_per_step"], 3),
            "triples_per_s": round(row["triples_per_s"], 1), "tokens_per_s": round(row["tokens_per_s"]),
            "tflops": round(row["tflops"], 3), "weights_mb": round(weights_mb), "stored_params": params,
            "peak_mb": round(peak_mb(args.device))}


def random_llama(folder: Path, shape: dict, tokenizer_from: str) -> Path:
    """A Llama of `shape` with random weights (bf16) and the embedded model's tokenizer, saved as a
    local Hugging Face folder `kalmkg train --base` takes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kalmkg.models import load_tokenizer, resolve_base

    resolved = resolve_base(tokenizer_from)
    tokenizer = load_tokenizer(resolved.path, resolved.name)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llama_cpp_encode(args) -> dict:
    from kalmkg.encode import GGUFEncoder
    from kalmkg.llamacpp import runtime
    from kalmkg.models import embedded_gguf

    gguf = Path(args.gguf) if args.gguf else embedded_gguf("smollm2-135m")
    encoder = GGUFEncoder(gguf)
    n = 256 if args.device.startswith("cuda") else 32  # a CPU's llama.cpp: about 5-10 such texts/s on 2 cores
    texts = [f"entity number {i}, a thing of the sample graph with a short description" for i in range(n)]
    encoder.encode(texts[:8])  # warm-up
    t0 = time.perf_counter()
    vectors = encoder.encode(texts)
    seconds = time.perf_counter() - t0
    offload = bool(runtime.load().llama_supports_gpu_offload())
    if args.device.startswith("cuda") and not offload:
        raise RuntimeError("the installed llama.cpp has no GPU offload (built without CUDA): "
                           "reinstall with `make install` where nvcc is found")
    return {"texts_per_s": round(len(texts) / seconds, 1), "dim": int(vectors.shape[1]), "gpu_offload": offload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", default="smollm2-135m", help="the model of the 'embedded' check")
    parser.add_argument("--gguf", default=None, help="the GGUF of the llama.cpp check (default: the embedded one)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per training check (GPU 5, CPU 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (5 if gpu else 1)
    started = time.perf_counter()
    rows: list[dict] = []

    def run(name: str, check) -> None:
        t0 = time.perf_counter()
        try:
            result, ok = check(), True
        except Exception as e:  # a check that fails is a row, not the end of the script
            result, ok = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}, False
            traceback.print_exc(file=sys.stderr)
        rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), **result})
        print(f"{name:<14}{'ok' if ok else 'FAILED':<8}{time.perf_counter() - t0:>7.1f} s  "
              + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)

    print(f"kalmkg GPU check on {args.device} ({'full size' if gpu else 'small: a CPU'}), "
          f"{args.steps} timed step(s) per training check")
    run("environment", lambda: check_environment(args))
    run("embedded", lambda: train_step(args, args.base, 64 if gpu else 8))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-llama"
        shape = ONE_B if gpu else SMALL
        built = {}

        def build() -> dict:
            t0 = time.perf_counter()
            random_llama(folder, shape, args.base)
            built["ok"] = True
            return {"layers": shape["num_hidden_layers"], "width": shape["hidden_size"],
                    "build_s": round(time.perf_counter() - t0, 1),
                    **train_step(args, str(folder), 32 if gpu else 8)}

        run("1B random" if gpu else "small random", build)
        if built:
            run("1B 4-bit" if gpu else "small 4-bit", lambda: train_step(args, str(folder), 32 if gpu else 8,
                                                                          quantize="4bit"))
    run("llama.cpp", lambda: llama_cpp_encode(args))
    total = time.perf_counter() - started
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks ok in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "seconds": round(total, 1), "rows": rows}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
