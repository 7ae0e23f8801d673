"""memcore's research harness: the papers' experiments (``python -m memcore experiment``), the demo,
the stability estimator, baselines, training loops, reference models, metrics, plots, dataset
readers and controlled corruptions. It sits above the core (it imports ``memcore``, never the
reverse) and needs the ``eval`` extra::

    pip install 'torch-memcore[eval]'      # scikit-learn, tqdm, matplotlib, pandas

Its modules import without the extra; each checks the packages it uses where it uses them (the
plots module at import, the experiment and the demo before they start) and raises an ImportError
naming the extra.
"""

import importlib
from types import ModuleType
from typing import Tuple

# import name -> package name in the `eval` extra
EXTRA = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib", "pandas": "pandas"}


class MissingExtraError(ImportError):
    """A package of the ``eval`` extra is not installed (the message names the extra)."""


def require(*modules: str) -> ModuleType:
    """Imports ``modules`` (dotted import names of the eval extra's packages) and returns the last;
    raises ImportError naming the ``eval`` extra and every package that is missing."""
    missing, last = [], None
    for name in modules:
        try:
            last = importlib.import_module(name)
        except ImportError:
            missing.append(EXTRA.get(name.split(".")[0], name.split(".")[0]))
    if missing:
        raise MissingExtraError(
            f"memcore.eval needs the 'eval' extra: pip install 'torch-memcore[eval]' "
            f"(missing: {', '.join(dict.fromkeys(missing))})"
        )
    return last


def require_extra(names: Tuple[str, ...] = tuple(EXTRA)) -> None:
    """Checks up front that the eval extra's packages (import names ``names``) are installed."""
    require(*names)


__all__ = ["require", "require_extra", "EXTRA", "MissingExtraError"]
