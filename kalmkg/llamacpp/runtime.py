"""The one way kalmkg opens llama.cpp: self-tested first (see `health`), its log silenced, GPU layers chosen."""

from __future__ import annotations

import os

_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it from C


def load():
    """The `llama_cpp` module, once this environment's build passed its self-test."""
    from kalmkg.llamacpp.health import ensure_healthy

    ensure_healthy()
    import llama_cpp

    quiet(llama_cpp)
    return llama_cpp


def default_threads(sysfs: str = "/sys/devices/system/cpu") -> int:
    """One thread per physical core this process may use. llama.cpp's threads busy-wait at every
    operation, so a second thread on a core's hyperthread slows it, while each real core speeds it up
    (the embedded model's 15-token view: 191 ms on one thread, 122 ms on two cores)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity, no sysfs topology
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"{sysfs}/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


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
