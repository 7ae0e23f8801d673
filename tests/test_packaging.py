"""memcore as a package: every install hint names what pyproject.toml declares, the sdist carries every
kernel source, the wheel installs into a fresh environment that has torch and runs the Quickstart
there, and an extension built for another torch is refused at import with what to do."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import memcore

try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["memcore", "README.md", "DEVELOPMENT.md", "docs", "examples", "scripts"]
DIST = "torch-memcore"
# pip options that take a value: the value is not a package
VALUED = {"-r", "-c", "-t", "-i", "-f", "-d", "--target", "--index-url", "--extra-index-url"}
VALUED |= {"--find-links", "--python", "--prefix", "--root", "--constraint", "--requirement"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _files():
    for part in PRODUCT:
        path = ROOT / part
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".py", ".md", ".sh", ".txt") and "__pycache__" not in f.parts:
                yield f


def install_hints():
    """(file, package token) for every `pip install ...` in the product's code and docs."""
    for f in _files():
        for m in re.finditer(r"\bpip install(?=[ \t])((?:(?!pip install)[^\n`])*)", f.read_text()):
            skip_next = False
            for raw in m.group(1).split():
                if raw in ("&&", "||", "|", ";") or raw.startswith(("#", "(")):
                    break  # the command ends
                tok = raw.strip("'\"`),;")
                if skip_next or raw in VALUED:
                    skip_next = not skip_next
                elif tok and not tok.startswith("-") and "$" not in tok and not tok.startswith("<"):
                    yield str(f.relative_to(ROOT)), tok
                if raw.endswith((";", ")")):
                    break


def test_install_hints_name_declared_packages():
    meta = _metadata()
    extras = meta["optional-dependencies"]
    declared = {DIST}
    for req in meta["dependencies"] + [r for reqs in extras.values() for r in reqs]:
        declared.add(_canonical(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    hints = list(install_hints())
    assert len(hints) >= 5 and any(tok.startswith(DIST) for _, tok in hints), hints
    for where, tok in hints:
        m = re.fullmatch(r"([A-Za-z0-9._-]+|\.)(?:\[([^\]]*)\])?(?:[<>=!~].*)?", tok)
        assert m, f"{where}: cannot read the install hint {tok!r}"
        name, wanted = m.group(1), m.group(2)
        if name != ".":
            assert _canonical(name) in declared, (
                f"{where}: `pip install {tok}` names a package pyproject.toml does not declare"
            )
        if wanted is not None:
            assert name == "." or _canonical(name) == DIST, f"{where}: extras of {name}"
            for extra in wanted.split(","):
                assert extra.strip() in extras, f"{where}: no extra {extra!r} in pyproject.toml"


def _build(tmp_path, *args):
    pytest.importorskip("build.__main__")  # the package, not a build/ output folder on the path
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,  # a wheel compiles whatever build/ does not hold yet
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_sdist_carries_every_kernel_source_and_no_build_output(tmp_path):
    _build(tmp_path, "--sdist")
    (sdist,) = tmp_path.glob("torch_memcore-*.tar.gz")
    assert sdist.name == f"torch_memcore-{memcore.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources and not sources - names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "README.md", "memcore/__init__.py", "memcore/py.typed"} <= names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_runs_the_quickstart(tmp_path):
    """python -m build --wheel, installed with pip into a new venv that sees this torch (and nothing
    else of this environment's memcore), then the README's Quickstart from outside the repository."""
    _build(tmp_path / "dist", "--wheel")
    (wheel,) = (tmp_path / "dist").glob("torch_memcore-*.whl")
    assert wheel.name.startswith(f"torch_memcore-{memcore.__version__}-")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch (and numpy) of this environment, as a path entry: its .pth files, an editable memcore's
    # among them, are not processed there
    Path(site, "torch_here.pth").write_text(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--no-compile", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0 and "Successfully installed torch-memcore" in r.stdout, r.stdout + r.stderr
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"^<!-- readme-test: run -->\n```python\n(.*?)^```", readme, re.S | re.M).group(1)
    check = (
        "import importlib.metadata, json, os\n"
        "print(json.dumps([memcore.__file__, importlib.metadata.version('torch-memcore')]))\n"
    )
    r = subprocess.run(
        [py, "-c", quickstart + check], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    where, version = json.loads(r.stdout.strip().splitlines()[-1])
    assert where.startswith(site) and version == memcore.__version__
    assert Path(where).with_name("_build_info.json").is_file()


def _import_with_record(tmp_path, record):
    """Imports a copy of this memcore (its built extension too) whose build record says `record`."""
    pkg = tmp_path / "pkg"
    shutil.copytree(
        os.path.dirname(memcore.__file__), pkg / "memcore", ignore=shutil.ignore_patterns("__pycache__")
    )
    (pkg / "memcore" / "_build_info.json").write_text(json.dumps(record))
    env = dict(os.environ, PYTHONPATH=str(pkg))
    return subprocess.run(
        [sys.executable, "-c", "import memcore; print(memcore.cpu_isa())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_import_refuses_an_extension_built_for_another_torch(tmp_path):
    ok = _import_with_record(tmp_path / "same", {"torch": torch.__version__, "cuda": torch.version.cuda})
    assert ok.returncode == 0 and ok.stdout.strip() == memcore.cpu_isa(), ok.stderr[-3000:]
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    other = f"{major}.{minor - 1}.0"
    r = _import_with_record(tmp_path / "other", {"torch": other, "cuda": None})
    assert r.returncode != 0
    assert (
        f"memcore._C was compiled against torch {other}, but torch {torch.__version__} is imported"
        in r.stderr
    )
    assert (
        f"Install torch=={major}.{minor - 1}.*" in r.stderr
        and "--no-build-isolation --force-reinstall" in r.stderr
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_import_refuses_a_cuda_build_under_a_cpu_only_torch(tmp_path):
    r = _import_with_record(tmp_path, {"torch": torch.__version__, "cuda": "13.0"})
    assert r.returncode != 0 and "is a CPU-only build" in r.stderr, r.stderr[-3000:]
