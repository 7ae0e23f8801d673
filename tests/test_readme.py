"""The documentation's runnable examples run as written, and the README agrees with the code.

Every ```python block right after a `<!-- readme-test: run -->` line (on a line of its own) in README.md, docs/*.md and
DEVELOPMENT.md is executed in a fresh namespace (unmarked blocks use placeholders such as `model`
and `loader` and are shown for shape only). The README's scores table must list exactly the
scores `Tracker.scores()` returns, each with the direction `export.ranked_issues` treats as
suspicious, and relative links in the docs must point at files that exist.
"""

import re
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

import memcore
from memcore import export

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "DEVELOPMENT.md"] + sorted((ROOT / "docs").glob("*.md"))
MARK = "<!-- readme-test: run -->"


def _existing_docs() -> List[Path]:
    return [p for p in DOCS if p.is_file()]


def runnable_blocks() -> List[Tuple[str, int, str]]:
    """(file name relative to the repository, 1-based block number in that file, code)."""
    out = []
    for path in _existing_docs():
        text = path.read_text()
        # a mark counts on a line of its own (prose may quote it)
        blocks = re.findall(r"^" + re.escape(MARK) + r"[ \t]*\n```python\n(.*?)^```", text, flags=re.S | re.M)
        marks = re.findall(r"^" + re.escape(MARK) + r"[ \t]*$", text, flags=re.M)
        name = str(path.relative_to(ROOT))
        assert len(blocks) == len(marks), f"{name}: a readme-test mark is not followed by a python block"
        out += [(name, i + 1, code) for i, code in enumerate(blocks)]
    return out


BLOCKS = runnable_blocks()


def test_readme_has_runnable_examples():
    assert sum(1 for name, _, _ in BLOCKS if name == "README.md") >= 2


# import names of the packages of torch-memcore's extras: a block needing a missing one is skipped
# (scripts/test.sh installs every extra, so there nothing is)
EXTRAS_MODULES = {"sklearn", "tqdm", "matplotlib", "pandas", "pyarrow", "transformers", "tokenizers"}
EXTRAS_MODULES |= {"accelerate", "datasets", "trl", "lightning"}


@pytest.mark.parametrize("name,number,code", BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_doc_example_runs(name, number, code, capsys):
    label = f"{name} example {number}"
    try:
        exec(compile(code, label, "exec"), {"__name__": re.sub(r"\W", "_", label)})
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXTRAS_MODULES:
            raise
        pytest.skip(f"{label} needs {e.name}, from an extra of torch-memcore")


def _scores_table() -> List[List[str]]:
    """Rows of the README table whose header is `| score | meaning | suspicious when |`."""
    lines = README.read_text().splitlines()
    header = "| score | meaning | suspicious when |"
    assert lines.count(header) == 1, "README needs exactly one scores table"
    start = lines.index(header)
    assert re.fullmatch(r"\|(\s*-+\s*\|){3}", lines[start + 1]), "scores table: missing separator row"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"scores table row with {len(cells)} cells: {line}"
        rows.append(cells)
    return rows


def test_readme_scores_table_matches_the_tracker():
    rows = _scores_table()
    names = [re.fullmatch(r"`(\w+)`", name).group(1) for name, _, _ in rows]
    assert len(names) == len(set(names)), "a score is listed twice"
    with pytest.warns(UserWarning, match="before any recorded epoch"):  # the names are what matters here
        empty = memcore.Tracker(4).scores()
    assert set(names) == set(empty) == set(memcore.SCORE_NAMES)
    for name, meaning, direction in rows:
        assert meaning, f"{name}: no meaning"
        assert direction in ("high", "low"), f"{name}: suspicious when {direction!r}"
        score = name.strip("`")
        # sample 0 has the highest value, sample 1 the lowest: the most suspicious one is
        # sample 0 when high is suspicious, sample 1 when low is
        values = {score: torch.tensor([3.0, -3.0, 0.0, 1.0], dtype=torch.float64)}
        top = int(export.ranked_issues(values, by=score, top=1)[0])
        assert top == (0 if direction == "high" else 1), f"{score}: README says {direction}"


def _anchors(path: Path) -> List[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings in code
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads]


def test_doc_links_point_at_files_and_headings():
    for path in _existing_docs():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # external
            file_part, _, anchor = target.partition("#")
            file = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)} links to {target}"
            assert file.exists(), f"{where}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file), f"{where}: no such heading"


def test_doc_test_references_name_existing_tests():
    """Every `test_x.py::test_name` a document cites (docs/guarantees.md maps promises to them) is a
    test function of that file under tests/."""
    cited = 0
    for path in _existing_docs():
        for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)", path.read_text()):
            test_file = ROOT / "tests" / file
            where = f"{path.relative_to(ROOT)} cites {file}::{name}"
            assert test_file.is_file(), f"{where}: no such test file"
            assert re.search(rf"^def {name}\(", test_file.read_text(), flags=re.M), f"{where}: no such test"
            cited += 1
    assert cited > 0
