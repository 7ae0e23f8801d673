"""Loads memcore._C after checking that it was built for the torch imported now.

A C++ extension is compiled against one torch's C++ API and ABI, which change between torch minor
versions: loaded into another, it fails with an undefined symbol or misbehaves. setup.py records the
torch it built against in ``_build_info.json`` beside the extension; a different minor version (or a
CPU-only torch under a CUDA build) raises ImportError here, saying what to do, before anything loads.
"""

import importlib
import importlib.util
import json
import os
import re
from types import ModuleType
from typing import Optional

import torch

BUILD_INFO = "_build_info.json"
# run in memcore's source tree (a clone, or an unpacked sdist)
REBUILD = "in memcore's source tree, pip install --no-build-isolation --force-reinstall --no-deps ."


def _minor(version: str) -> Optional[str]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return m.group(0) if m else None


def check(info: dict) -> None:
    """Raises ImportError when the build record ``info`` does not fit the torch imported now."""
    built = str(info.get("torch", ""))
    if _minor(built) != _minor(torch.__version__):
        raise ImportError(
            f"memcore._C was compiled against torch {built}, but torch {torch.__version__} is imported; "
            f"an extension works only with the torch minor version it was built with (torch's C++ ABI "
            f"changes between them). Install torch=={_minor(built)}.* (a wheel of memcore for torch "
            f"{_minor(torch.__version__)}), or rebuild memcore against this torch: {REBUILD}"
        )
    if info.get("cuda") and torch.version.cuda is None:
        raise ImportError(
            f"memcore._C was built with CUDA kernels against torch {built} (CUDA {info['cuda']}), but "
            f"the torch imported, {torch.__version__}, is a CPU-only build: install that CUDA build of "
            f"torch, or rebuild memcore against this torch: {REBUILD}"
        )


def load() -> ModuleType:
    spec = importlib.util.find_spec("memcore._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"memcore's compiled extension memcore._C is not built in {os.path.dirname(__file__)}: "
            f"install memcore with pip install --no-build-isolation . (from its source tree), or build it "
            f"in place there with python setup.py build_ext --inplace"
        )
    path = os.path.join(os.path.dirname(spec.origin), BUILD_INFO)
    info = None
    if os.path.isfile(path):  # a build by an older setup.py records nothing: nothing to compare
        with open(path) as f:
            info = json.load(f)
        check(info)
    try:
        return importlib.import_module("memcore._C")
    except ImportError as e:
        built = f"built against torch {info['torch']}" if info else "with no record of its torch"
        raise ImportError(
            f"{e}\nmemcore._C ({spec.origin}, {built}) does not load into torch {torch.__version__}: "
            f"rebuild it against this torch: {REBUILD}"
        ) from e


_C = load()
