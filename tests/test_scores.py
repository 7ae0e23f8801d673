"""The score registry (memcore.scores) is the one place a score's suspicious direction is kept:
the tracker, export, the harness's baselines and demo, and README's scores table all agree with it."""

import re
from pathlib import Path

import pytest
import torch

import memcore
from memcore import export
from memcore.scores import LOW_IS_SUSPICIOUS, SCORE_NAMES, SCORES, sign, suspicion

README = Path(__file__).resolve().parents[1] / "README.md"


def _tracked_scores():
    torch.manual_seed(0)
    tr = memcore.Tracker(6)
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(4, 3)
    for _ in range(2):
        memcore.accumulate(x @ w, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), tr, inputs=x).backward()
        tr.end_epoch()
    return tr.scores()


def test_registry_is_what_the_tracker_returns():
    from memcore.tracker import SCORE_NAMES as tracker_names

    assert SCORE_NAMES == tuple(SCORES) == tracker_names == memcore.SCORE_NAMES and memcore.SCORES is SCORES
    scores = _tracked_scores()
    assert tuple(scores) == SCORE_NAMES
    for name, s in scores.items():
        entry = SCORES[name]
        assert entry.name == name and entry.suspicious in ("high", "low") and entry.meaning
        assert s.dtype == entry.dtype and s.shape == (6,), name


def test_export_orients_every_score_by_the_registry():
    scores = _tracked_scores()
    assert LOW_IS_SUSPICIOUS == {n for n, s in SCORES.items() if s.suspicious == "low"}
    assert export.LOW_IS_SUSPICIOUS is LOW_IS_SUSPICIOUS
    for name in SCORE_NAMES:
        first = int(export.ranked_issues(scores, by=name, top=1)[0])
        s = scores[name]
        best = s.max() if SCORES[name].suspicious == "high" else s.min()
        assert s[first] == best, name
        torch.testing.assert_close(suspicion(name, s), s * sign(name))
    with pytest.raises(KeyError, match="nope"):
        sign("nope")


def test_harness_orients_by_the_registry():
    from memcore.eval import baselines, demo

    scores = _tracked_scores()
    oriented = baselines.from_tracker(scores)
    torch.testing.assert_close(oriented["aum"], -scores["aum"])
    torch.testing.assert_close(oriented["forgetting"], scores["forgetting"])
    torch.testing.assert_close(oriented["in_confidence"], 1.0 - scores["confidence_mean"])
    torch.testing.assert_close(oriented["loss_sensitivity"], scores["input_grad_norm"])
    assert set(demo.SUSPICION) <= set(SCORES)
    assert all(isinstance(label, str) for label in demo.SUSPICION.values())  # no direction kept there


def _readme_score_table():
    """{score name: direction} from README's markdown table whose header has a `score` column and
    a `suspicious when` column (column order, backticks, spacing and case do not matter; one row
    may list several names separated by commas)."""
    lines = README.read_text().splitlines()

    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        head = [c.strip("`* ").lower() for c in cells(line)]
        if "score" not in head or "suspicious when" not in head:
            continue
        name_col, dir_col = head.index("score"), head.index("suspicious when")
        table = {}
        for row in lines[i + 1 :]:
            if not row.lstrip().startswith("|"):
                break
            c = cells(row)
            if set("".join(c)) <= set("-: "):  # the |---|---| line
                continue
            direction = c[dir_col].strip("`* ").lower() if dir_col < len(c) else ""
            for name in re.findall(r"[a-z_]+", c[name_col].replace("`", "")):
                table[name] = direction
        return table
    return None


def test_readme_scores_table_matches_the_registry():
    table = _readme_score_table()
    assert table is not None, "README.md has no table with `score` and `suspicious when` columns"
    missing = [n for n in SCORE_NAMES if n not in table]
    assert not missing, f"README's scores table lacks {missing}"
    wrong = {n: (table[n], SCORES[n].suspicious) for n in SCORE_NAMES if table[n] != SCORES[n].suspicious}
    assert not wrong, f"README direction vs registry: {wrong}"
