"""The child process of `health`: exercise what kalmkg uses of llama.cpp, print one JSON line.

Run as ``python -m kalmkg.llamacpp.selftest``. It loads the embedded GGUF twice (generation, then
last-token embeddings), so every kernel kalmkg calls on this CPU has run once: a crash here, not in a
user's command.
"""

from __future__ import annotations

import json
import os
import time


def main() -> None:
    import llama_cpp

    from kalmkg.encode import embed_rows
    from kalmkg.llamacpp.runtime import gpu_layers, quiet
    from kalmkg.models import embedded_gguf

    quiet(llama_cpp)
    path = str(embedded_gguf("smollm2-135m"))
    t0 = time.perf_counter()
    threads = min(2, os.cpu_count() or 1)  # the thread pool's code paths, too
    # the CPU kernels always run (where a bad build dies); with a GPU build, the offloaded path as well
    layers = [0, -1] if gpu_layers(llama_cpp) else [0]
    for n_gpu_layers in layers:
        gen = llama_cpp.Llama(path, n_ctx=128, n_threads=threads, n_gpu_layers=n_gpu_layers, verbose=False)
        out = gen("The capital of France is", max_tokens=4, temperature=0.0)
        gen.close()
        emb = llama_cpp.Llama(path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=128,
                              n_threads=threads, n_gpu_layers=n_gpu_layers, verbose=False)
        vec = embed_rows(emb, [emb.tokenize(b"Paris", add_bos=False), emb.tokenize(b"France", add_bos=False)])
        emb.close()
    print(json.dumps({"generated": out["choices"][0]["text"], "embedding_dim": int(vec.shape[1]),
                      "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                      "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                      "run_s": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
