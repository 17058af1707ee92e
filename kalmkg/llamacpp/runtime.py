"""The one way kalmkg opens llama.cpp: self-tested first (see `health`), its log silenced, GPU layers chosen."""

from __future__ import annotations

_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it from C


def load():
    """The `llama_cpp` module, once this environment's build passed its self-test."""
    from kalmkg.llamacpp.health import ensure_healthy

    ensure_healthy()
    import llama_cpp

    quiet(llama_cpp)
    return llama_cpp


def quiet(llama_cpp) -> None:
    """llama.cpp logs model loading to stderr even with verbose=False; the CLI prints its own messages.
    (The log callback is process-wide in llama.cpp; kalmkg never wants those lines.)"""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def gpu_layers(llama_cpp) -> int:
    """Every layer on the GPU when the library was built with one (CUDA), none otherwise."""
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def sequence_batches(lengths, n_batch: int, n_seq: int) -> list[list[int]]:
    """Consecutive rows packed into llama.cpp batches (one sequence id per row): at most `n_batch`
    tokens and `n_seq` sequences each; indices into `lengths`. ValueError for a row that fits none."""
    groups: list[list[int]] = []
    used = n_batch
    for i, n in enumerate(lengths):
        if n > n_batch:
            raise ValueError(f"a row of {n} tokens exceeds the batch size {n_batch}")
        if not groups or used + n > n_batch or len(groups[-1]) >= n_seq:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
