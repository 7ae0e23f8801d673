"""The core (accumulate, Tracker, scores, export) works where none of the eval extra's packages can
be imported, and the harness then fails with an ImportError that names the extra."""

import os
import subprocess
import sys
import textwrap

import pytest

import memcore

# The blocked packages look uninstalled: `import pandas` raises ModuleNotFoundError and
# importlib.util.find_spec("pandas") returns None, as on a machine without them (torch probes
# optional packages with find_spec, so a sys.meta_path finder that raises would break torch itself,
# and one that returns None cannot stop the path finders after it). A None entry in sys.modules
# gives exactly that behaviour, for the package and all its submodules.
BLOCKER = textwrap.dedent("""
    import sys

    for name in {BLOCKED}:
        sys.modules[name] = None
""")
EXTRA = ("sklearn", "matplotlib", "tqdm", "pandas")


def _run(code: str, blocked=EXTRA, cwd=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    src = BLOCKER.format(BLOCKED=repr(set(blocked))) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", src],
        env=dict(os.environ, PYTHONPATH=path),
        cwd=cwd or root,  # `python -c` puts its cwd first on sys.path: the memcore under test is there
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_core_works_without_the_eval_extra(tmp_path):
    r = _run(
        """
        import torch
        import memcore
        from memcore import export
        from memcore.data import IndexedDataset

        torch.manual_seed(0)
        n, c = 64, 5
        x = torch.randn(n, 8)
        y = torch.randint(0, c, (n,))
        ds = IndexedDataset(x, y, num_classes=c)
        model = torch.nn.Linear(8, c)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = memcore.Tracker(n)
        for epoch in range(3):
            for start in range(0, n, 16):
                xb, yb, idx = ds.x[start:start + 16], ds.y[start:start + 16], torch.arange(start, start + 16)
                xb = xb.clone().requires_grad_()
                loss = memcore.accumulate(model(xb), yb, idx, tracker, inputs=xb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            tracker.end_epoch()
        scores = tracker.scores()
        assert tuple(scores) == memcore.SCORE_NAMES
        # every sample is seen; forgetting is +inf for one never classified correctly
        assert all(torch.isfinite(s).all() for k, s in scores.items() if k != "forgetting")
        assert not scores["forgetting"].isnan().any() and (scores["forgetting"] >= 0).all()
        top = export.ranked_issues(scores, by="csl", top=5)
        assert len(top) == 5 and scores["csl"][top[0]] == scores["csl"].max()
        export.to_csv(scores, "scores.csv", labels=y)
        try:
            export.to_dataframe(scores)
        except ImportError as e:
            assert "torch-memcore[export]" in str(e), e
        else:
            raise AssertionError("pandas was importable")
        for m in ("sklearn", "matplotlib", "tqdm", "pandas"):
            assert sys.modules[m] is None, m  # still blocked: nothing got around the blocker
        print("core ok", memcore.cpu_isa())
    """,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "core ok" in r.stdout, r.stdout + r.stderr[-3000:]
    assert (tmp_path / "scores.csv").read_text().startswith("index,label,csl,")


@pytest.mark.slow
def test_plots_without_matplotlib_names_the_extra():
    r = _run(
        """
        try:
            import memcore.eval.plots
        except ImportError as e:
            print("ImportError:", e)
    """,
        blocked=("matplotlib",),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "memcore.eval needs the 'eval' extra: pip install 'torch-memcore[eval]' (missing: matplotlib)"
        in r.stdout
    )


@pytest.mark.slow
def test_experiment_without_the_extra_fails_before_training(tmp_path):
    """The CLI reports the missing extra as an error line (no traceback) and trains nothing."""
    out = tmp_path / "run"
    r = _run(
        f"""
        import sys
        from memcore.__main__ import main
        sys.exit(main(["experiment", "--epochs", "1", "--noise", "0.1", "--out", {str(out)!r}]))
    """,
        blocked=("matplotlib", "tqdm"),
    )
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    assert (
        "error: memcore.eval needs the 'eval' extra" in r.stderr and "missing: tqdm, matplotlib" in r.stderr
    )
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.slow
def test_help_works_without_the_extra():
    r = _run("""
        from memcore.__main__ import main
        main(["experiment", "--help"])
    """)
    assert r.returncode == 0 and "--curvature-every" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_harness_modules_import_without_the_extra():
    """Only plots needs its packages at import; the others check where they use them."""
    r = _run("""
        import memcore.eval.experiment, memcore.eval.demo, memcore.eval.stability, memcore.eval.baselines
        import memcore.eval.datasets, memcore.eval.corruptions, memcore.eval.metrics, memcore.eval.models
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
