#!/usr/bin/env python
"""Rerunnable mutation check of memcore's Python layer.

Each mutant is one textual replacement in one file of memcore/ (it must match exactly once). For
each, memcore/ (with its built extension) is copied to a temporary directory, the mutant applied
there, and the tests named for it run against that copy; the mutant is killed when they fail.
The unmutated copy must pass the same tests first. The kernels are not mutated here: that needs a
rebuild per mutant.

    python tools/mutation_check.py              # all mutants
    python tools/mutation_check.py -k lock      # those whose name contains "lock"
    python tools/mutation_check.py --list

Exit status 0 when every selected mutant is killed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

TRACKER = [
    "test_tracker.py",
    "test_reliability.py::test_resume_keeps_prev_correct",
    "test_reliability.py::test_samples_missing_from_an_epoch_keep_their_history",
    "test_reliability.py::test_constructed_prev_correct_and_learned_since_across_a_gap",
]
LOAD = [
    "test_reliability.py::test_load_state_dict_is_atomic",
    "test_reliability.py::test_load_refuses_pickled_callables_and_runs_nothing",
    "test_reliability.py::test_save_load_weights_only_round_trip",
    "test_tracker.py",
]

# (name, file under memcore/, old text, new text, tests: files or node ids under tests/)
MUTANTS = [
    # the per-sample state (memcore/_layout.py): "prev_correct" is learned_since >= 0 there
    (
        "prev_correct lost",
        "_layout.py",
        "prev_correct = learned >= 0  #",
        "prev_correct = torch.zeros_like(seen)  #",
        TRACKER,
    ),
    (
        "learning run restarted every epoch",
        "_layout.py",
        "start = torch.where(prev_correct, learned, torch.full_like(learned, epoch))",
        "start = torch.full_like(learned, epoch)",
        TRACKER,
    ),
    (
        "learned_since reset when unseen",
        "_layout.py",
        "learned_since=torch.where(seen, torch.where(correct, start, torch.full_like(start, -1)), learned)",
        "learned_since=torch.where(correct, start, torch.full_like(start, -1))",
        TRACKER,
    ),
    (
        "inputs= mean over all rows",
        "cross_entropy.py",
        "out = loss.sum() / (targets1d != ignore_index).sum()",
        "out = loss.sum() / targets1d.numel()",
        ["test_reliability.py::test_loss_with_inputs_and_ignored_rows", "test_cross_entropy_input_grad.py"],
    ),
    (
        "DDP grad rows not committed",
        "tracker.py",
        "L.commit_grad_rows(self._st, gidx - self._start, gvals[:, 0], torch.ones_like(gidx))",
        "pass",
        ["test_reliability.py::test_input_gradient_statistics_are_merged_across_ranks"],
    ),
    # checkpoints, locking and input validation
    (
        "load with weights_only=False",
        "_io.py",
        'map_location="cpu", weights_only=True',
        'map_location="cpu", weights_only=False',
        LOAD,
    ),
    ("load_state_dict accepts negative epochs", "tracker.py", "if epochs < 0:", "if epochs < -10**9:", LOAD),
    ("load_state_dict skips history length", "tracker.py", "or len(hist) != want_len:", ":  # noqa", LOAD),
    ("load_state_dict skips buffer ranges", "tracker.py", "if not bool(ok(bufs[k])):", "if False:", LOAD),
    (
        "load_state_dict skips correct <= rows",
        "tracker.py",
        "& (t[:, C.C_CORRECT] <= t[:, C.C_ROWS]).all()",
        "",
        LOAD,
    ),
    (
        "load_state_dict swaps before checking",
        "tracker.py",
        "            new = self._checked_state(state)\n",
        "            self._set_buffers({k: v.clone() for k, v in state.get('buffers', {}).items()"
        " if isinstance(v, torch.Tensor)})\n            new = self._checked_state(state)\n",
        LOAD,
    ),
    (
        "format-1 state converted unchecked",
        "tracker.py",
        "            _check_state(state, 1, self.num_samples, 0, self.num_samples)\n",
        "",
        ["test_reliability.py::test_load_of_a_bad_format_1_state_is_atomic", "test_tracker.py"],
    ),
    (
        "per-process temporary file",
        "_io.py",
        'fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")',
        'tmp = f"{path}.tmp{os.getpid()}"; fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)',
        ["test_reliability.py::test_concurrent_saves_to_one_path"],
    ),
    (
        "no tracker lock",
        "tracker.py",
        "else self._lock",
        "else contextlib.nullcontext()",
        ["test_reliability.py::test_concurrent_accumulate_loses_no_rows"],
    ),
    (
        "autocast keeps the 16-bit dtype",
        "cross_entropy.py",
        "        return torch.float32\n",
        "        return logits.dtype\n",
        ["test_reliability.py::test_autocast_value_and_dtype_match_f_cross_entropy"],
    ),
    (
        "shared inputs= not detected",
        "cross_entropy.py",
        'if any("g" in u for u in peers if u is not upstream):',
        "if False:",
        ["test_reliability.py::test_inputs_shared_by_two_accumulate_calls_raises"],
    ),
    (
        "overflow explained as NaN / inf logits",
        "_validate.py",
        "if torch.isfinite(exact[row]):",
        "if False:",
        ["test_reliability.py::test_finite_logits_whose_loss_overflows_float32"],
    ),
    (
        "negative top accepted",
        "export.py",
        " or top < 0)",
        ")",
        ["test_reliability.py::test_ranked_issues_refuses_negative_top", "test_export.py"],
    ),
    (
        "to_csv unchecked labels",
        "export.py",
        "    n, lab_t = _columns(scores, labels)\n",
        "    n, lab_t = len(next(iter(scores.values()))), (None if labels is None else torch.as_tensor(labels))\n",
        ["test_reliability.py::test_to_csv_checks_lengths_before_writing", "test_export.py"],
    ),
    (
        "meta device adopted",
        "tracker.py",
        'if device.type == "meta":',
        "if False:",
        ["test_reliability.py::test_meta_first_batch_leaves_tracker_usable"],
    ),
    (
        "rank settings unchecked",
        "_shard.py",
        "        if not same:\n",
        "        if False:\n",
        ["test_reliability.py::test_ranks_with_different_num_samples_get_a_clear_error"],
    ),
    (
        "rank epochs unchecked",
        "tracker.py",
        "if hi != lo:",
        "if False:",
        ["test_reliability.py::test_ranks_with_different_epoch_counts_get_a_clear_error"],
    ),
    (
        "float ignore_index accepted",
        "_validate.py",
        "return operator.index(ignore_index)",
        "return int(ignore_index)",
        ["test_reliability.py::test_numpy_integer_ignore_index"],
    ),
    # long-standing semantics
    (
        "deferred errors dropped",
        "tracker.py",
        "self._errors.bitwise_or_(status)",
        "pass",
        ["test_cross_entropy_bad_input.py", "test_cross_entropy_ops.py::test_compiled_step_defers_errors"],
    ),
    (
        "rejected batch still scales input grads",
        "cross_entropy.py",
        "& (g != 0) & (status == 0)",
        "& (g != 0)",
        ["test_cross_entropy_input_grad.py", "test_cross_entropy_bad_input.py"],
    ),
    (
        "correct threshold strict",
        "_layout.py",
        "counts[:, C_CORRECT_E].double() >= correct_threshold * rows_e - 1e-9",
        "counts[:, C_CORRECT_E].double() > correct_threshold * rows_e",
        TRACKER,
    ),
    (
        "forgetting counted when unseen",
        "_layout.py",
        "forgot = seen & prev_correct & ~correct",
        "forgot = prev_correct & ~correct",
        TRACKER,
    ),
    (
        "confidence_std without square",
        "_layout.py",
        "var = (mean(sums[:, S_PROB_SQ]) - conf * conf).clamp_min(0)",
        "var = (mean(sums[:, S_PROB_SQ]) - conf).clamp_min(0)",
        TRACKER,
    ),
    (
        "open epoch ignored by scores",
        "tracker.py",
        "open_epoch = self._open_epoch()",
        "open_epoch = False",
        TRACKER,
    ),
    (
        "never-learned learning time off by one",
        "_layout.py",
        "lt = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)).double()",
        "lt = torch.where(learned >= 0, learned, torch.full_like(learned, max(epochs - 1, 0))).double()",
        TRACKER,
    ),
    (
        "reduction none not reshaped",
        "cross_entropy.py",
        "out = loss.reshape(targets.shape)",
        "out = loss",
        ["test_cross_entropy.py", "test_integrations.py"],
    ),
]


def _copy(dst: str) -> None:
    for pkg in ("memcore", "benchmarks"):  # benchmarks: tests import it from the root (pytest pythonpath)
        if os.path.isdir(os.path.join(ROOT, pkg)):
            shutil.copytree(
                os.path.join(ROOT, pkg), os.path.join(dst, pkg), ignore=shutil.ignore_patterns("__pycache__")
            )


def _run_tests(workdir: str, tests, timeout: float) -> "tuple[bool, str]":
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the copy is found first: python -m puts the cwd on sys.path
    env["HYPOTHESIS_PROFILE"] = env.get("HYPOTHESIS_PROFILE", "ci")
    # pyproject.toml's pythonpath = ["."] would put the repository (and its unmutated memcore) first
    # on sys.path: point it at the copy instead
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-o",
        f"pythonpath={workdir}",
        *[os.path.join(TESTS, t) for t in tests],
    ]
    try:
        r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    tail = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode == 0, tail[-1] if tail else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.k.lower() in m[0].lower()]
    if args.list:
        for name, f, *_ in chosen:
            print(f"{name}  ({f})")
        return 0
    killed = 0
    with tempfile.TemporaryDirectory(prefix="memcore-mut-") as tmp:
        _copy(tmp)
        probe = subprocess.run(
            [sys.executable, "-c", "import memcore; print(memcore.__file__)"],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        if not probe.stdout.strip().startswith(tmp):
            print(f"the copy is not the memcore the tests import: {probe.stdout}{probe.stderr}")
            return 2
        # the tests must import the copy: a probe test run exactly as the mutants' tests are
        probe_test = os.path.join(tmp, "test_probe_copy.py")
        with open(probe_test, "w") as f:
            f.write(
                f"import memcore\n\ndef test_copy():\n    assert memcore.__file__.startswith({tmp!r}), "
                f"memcore.__file__\n"
            )
        ok, tail = _run_tests(tmp, [probe_test], args.timeout)
        if not ok:
            print(f"the tests do not import the copy of memcore: {tail}")
            return 2
        tests = sorted({t for m in chosen for t in m[4]})
        ok, tail = _run_tests(tmp, tests, args.timeout * 3)
        print(f"unmutated copy: {'pass' if ok else 'FAIL'}  {tail}")
        if not ok:
            return 2
        for name, rel, old, new, tests in chosen:
            path = os.path.join(tmp, "memcore", *rel.split("/"))
            orig = open(path).read()
            if orig.count(old) != 1:
                print(f"{'STALE':8s} {name}: the text to mutate occurs {orig.count(old)} times in {rel}")
                continue
            open(path, "w").write(orig.replace(old, new))
            t0 = time.time()
            try:
                passed, tail = _run_tests(tmp, tests, args.timeout)
            finally:
                open(path, "w").write(orig)
            killed += not passed
            print(
                f"{'killed' if not passed else 'SURVIVED':8s} {name}  ({time.time() - t0:.0f} s; {tail})",
                flush=True,
            )
    print(f"score: {killed}/{len(chosen)} mutants killed")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
