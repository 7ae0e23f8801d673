"""The README's runnable examples run as written: every ```python block right after a
`<!-- readme-test: run -->` line is executed in a fresh namespace (the others use placeholders
such as `model` and `loader` and are shown for shape only)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- readme-test: run -->"


def runnable_blocks():
    text = README.read_text()
    blocks = re.findall(re.escape(MARK) + r"\s*\n```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == text.count(MARK), "a readme-test mark is not followed by a python block"
    return blocks


def test_readme_has_runnable_examples():
    assert len(runnable_blocks()) >= 2


@pytest.mark.parametrize("i", range(len(runnable_blocks())))
def test_readme_example_runs(i, capsys):
    code = runnable_blocks()[i]
    exec(compile(code, f"README.md example {i + 1}", "exec"), {"__name__": f"readme_example_{i + 1}"})
