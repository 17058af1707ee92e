"""llama.cpp inside kalmkg: a build for the machine it runs on (`build`), a self-test before first use
(`health`), and the one way kalmkg opens the library (`runtime`).

Nothing here imports llama_cpp at module level: `build` runs before it is installed.
"""
