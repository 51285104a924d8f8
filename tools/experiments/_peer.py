"""The PyTorch/NumPy peer of the alignment objective (tools/benchmarks/alignment.py), loaded
by path: tools/ is not a package."""

import importlib.util
import os

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "benchmarks", "alignment.py")


def load():
    spec = importlib.util.spec_from_file_location("alignment_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
