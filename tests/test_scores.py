"""The score registry (memcore.scores) is the one place a score's suspicious direction is kept:
the tracker, export, the harness's baselines and demo, and README's scores table all agree with it."""

import re
from pathlib import Path

import numpy as np
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
    assert set(demo.SIGNALS) <= set(SCORES)  # names only: the direction is the registry's


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


def _forgetting_fixture():
    """Five samples over four epochs (2 classes, label 0): 0 never right; 1 right, then wrong (one
    event); 2 always right; 3 never seen; 4 right then wrong twice over (two events, last wrong);
    5 seen in the last epoch only, wrong."""
    right, wrong = [4.0, 0.0], [0.0, 4.0]
    plan = {
        0: [wrong, wrong, wrong, wrong],
        1: [wrong, right, wrong, wrong],
        2: [right, right, right, right],
        4: [right, wrong, right, wrong],
        5: [None, None, None, wrong],
    }
    tr = memcore.Tracker(6)
    for e in range(4):
        ids = [i for i, zs in plan.items() if zs[e] is not None]
        z = torch.tensor([plan[i][e] for i in ids])
        memcore.accumulate(z, torch.zeros(len(ids), dtype=torch.long), torch.tensor(ids), tr)
        tr.end_epoch()
    return tr


def test_forgetting_counts_a_never_learned_sample_as_forgotten_infinitely_often():
    """Toneva et al.'s convention: never classified correctly in any epoch it was seen -> +inf;
    forgetting_events keeps the raw transition count; unseen -> NaN / 0."""
    s = _forgetting_fixture().scores()
    inf = float("inf")
    assert s["forgetting"][[0, 1, 2, 4, 5]].tolist() == [inf, 1.0, 0.0, 2.0, inf]
    assert torch.isnan(s["forgetting"][3])
    assert s["forgetting_events"].tolist() == [0.0, 1.0, 0.0, 0.0, 2.0, 0.0]
    # never-learned samples rank first, unseen last; the quality of both never-learned is lowest
    order = export.ranked_issues(s, by="forgetting").tolist()
    assert set(order[:2]) == {0, 5} and order[2:] == [4, 1, 2, 3]
    q = export.label_quality_scores(s, by="forgetting")
    assert set(np.argsort(q, kind="stable")[:2].tolist()) == {0, 5} and q[3] == 1.0
    # the raw count ranks them with the always-right sample, below the forgotten ones
    assert export.ranked_issues(s, by="forgetting_events", top=2).tolist() == [4, 1]


def test_forgetting_of_an_open_epoch_and_after_a_resume():
    """The open epoch counts as closed; a state saved and loaded gives the same forgetting (the
    ever-correct flag is derived from the stored state, not kept beside it)."""
    tr = memcore.Tracker(2)
    memcore.accumulate(torch.tensor([[0.0, 4.0], [4.0, 0.0]]), torch.tensor([0, 0]), torch.arange(2), tr)
    assert tr.scores()["forgetting"].tolist() == [float("inf"), 0.0]  # open epoch, no end_epoch yet
    tr.end_epoch()
    back = memcore.Tracker(2)
    back.load_state_dict(tr.state_dict())
    for t in (tr, back):  # sample 0 learned, sample 1 forgotten
        memcore.accumulate(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0]), torch.arange(2), t)
        t.end_epoch()
    a, b = tr.scores(), back.scores()
    assert a["forgetting"].tolist() == b["forgetting"].tolist() == [0.0, 1.0]
    assert a["forgetting_events"].tolist() == [0.0, 1.0]
