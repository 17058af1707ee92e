"""`python tests/without_ml.py ARGS` is `kalmkg ARGS` in a Python where torch, transformers, peft,
accelerate, safetensors and sentencepiece cannot be imported, as after a plain `pip install kalmkg`
without the `train` extra."""

import importlib.abc
import sys

from kalmkg.cli.app import TRAIN_EXTRA


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in TRAIN_EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if __name__ == "__main__":
    for loaded in [m for m in sys.modules if m.split(".")[0] in TRAIN_EXTRA]:
        raise SystemExit(f"{loaded} was imported before the blocker")
    sys.meta_path.insert(0, _Missing())
    from kalmkg.cli.app import main

    sys.argv = ["kalmkg", *sys.argv[1:]]
    main()
