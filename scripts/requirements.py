"""Prints what pip installs for memcore, one requirement a line, from pyproject.toml (the only place
the lists live): the core dependencies, the packages of the extras named (``all``: every extra;
``torch-memcore[...]`` inside an extra expanded), and with ``--build`` what building memcore._C
needs besides torch (the build-system requirements and ninja).

    python scripts/requirements.py --build eval export
"""

import os
import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11: the TOML reader pip vendors
    from pip._vendor import tomli as tomllib

SELF = "torch-memcore"


def requirements(extras, build=False):
    with open(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb"
    ) as f:
        meta = tomllib.load(f)
    optional = meta["project"]["optional-dependencies"]
    todo = list(optional) if "all" in extras else list(extras)
    unknown = sorted(set(todo) - set(optional))
    if unknown:
        raise SystemExit(
            f"no extra named {', '.join(unknown)} in pyproject.toml (have: {', '.join(optional)})"
        )
    out = list(meta["project"]["dependencies"])
    if build:
        out += meta["build-system"]["requires"] + ["ninja"]
    seen = set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(re.escape(SELF) + r"\[([^\]]+)\]", req.replace(" ", ""))
            if m:
                todo += m.group(1).split(",")
            else:
                out.append(req)
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    print("\n".join(requirements([a for a in args if a != "--build"], build="--build" in args)))
