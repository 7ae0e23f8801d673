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
    "test_checkpoint.py::test_resume_keeps_prev_correct",
]
LOAD = [
    "test_checkpoint.py::test_load_state_dict_is_atomic",
    "test_checkpoint.py::test_load_refuses_pickled_callables_and_runs_nothing",
    "test_checkpoint.py::test_save_load_weights_only_round_trip",
    "test_tracker.py",
]
SHARD = ["test_shard.py::test_sharded_matches_dense_and_reshards"]
DIST = "test_distributed.py::"  # one pair of processes runs every case of the file: name the test

# (name, file under memcore/, old text, new text, tests: files or node ids under tests/)
MUTANTS = [
    # the per-sample state (memcore/_state.py): "prev_correct" is learned_since >= 0 there
    (
        "prev_correct lost",
        "_state.py",
        "prev_correct = learned >= 0  #",
        "prev_correct = torch.zeros_like(seen)  #",
        TRACKER,
    ),
    (
        "learning run restarted every epoch",
        "_state.py",
        "start = torch.where(prev_correct, learned, torch.full_like(learned, epoch))",
        "start = torch.full_like(learned, epoch)",
        TRACKER,
    ),
    (
        "learned_since reset when unseen",
        "_state.py",
        "learned_since=torch.where(seen, torch.where(correct, start, torch.full_like(start, -1)), learned)",
        "learned_since=torch.where(correct, start, torch.full_like(start, -1))",
        TRACKER,
    ),
    (
        "correct threshold strict",
        "_state.py",
        "counts[:, C_CORRECT_E].double() >= correct_threshold * rows_e - 1e-9",
        "counts[:, C_CORRECT_E].double() > correct_threshold * rows_e",
        TRACKER,
    ),
    (
        "forgetting counted when unseen",
        "_state.py",
        "forgot = seen & prev_correct & ~correct",
        "forgot = prev_correct & ~correct",
        TRACKER,
    ),
    (
        "stale gradient fields kept in a storage tracker on load",
        "_state.py",
        "    for k in [k for k in st if k not in new]:\n        del st[k]\n",
        "",
        ["test_tracker.py::test_storage_tracker_drops_fields_the_loaded_state_lacks"],
    ),
    (
        "gradient epoch set before its fields exist",
        "tracker.py",
        '        if "grad_sq_sum" not in self._st:\n            S.add_grad_fields(self._st, self._tau is not None, self._storage)\n'
        "        if self._grad_start < 0:\n            self._grad_start = self.epochs",
        "        if self._grad_start < 0:\n            self._grad_start = self.epochs\n"
        '        if "grad_sq_sum" not in self._st:\n            S.add_grad_fields(self._st, self._tau is not None, self._storage)',
        ["test_tracker.py::test_lost_storage_directory_keeps_the_state_readable"],
    ),
    (
        "second tracker on a storage directory",
        "_state.py",
        "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        ["test_tracker.py::test_storage_directory_holds_one_live_tracker"],
    ),
    # the scores (memcore/scores.py)
    (
        "confidence_std without square",
        "scores.py",
        "var = (mean(sums[:, S.S_PROB_SQ]) - conf * conf).clamp_min(0)",
        "var = (mean(sums[:, S.S_PROB_SQ]) - conf).clamp_min(0)",
        TRACKER,
    ),
    (
        "never-learned learning time off by one",
        "scores.py",
        "lt = torch.where(learned >= 0, learned, torch.full_like(learned, epochs)).double()",
        "lt = torch.where(learned >= 0, learned, torch.full_like(learned, max(epochs - 1, 0))).double()",
        TRACKER,
    ),
    (
        "open epoch ignored by scores",
        "tracker.py",
        "open_epoch = self._open_epoch()",
        "open_epoch = False",
        TRACKER,
    ),
    # the loss wrappers
    (
        "inputs= mean over all rows",
        "cross_entropy.py",
        "out = loss.sum() / (targets1d != ignore_index).sum()",
        "out = loss.sum() / targets1d.numel()",
        [
            "test_cross_entropy_autograd.py::test_loss_with_inputs_and_ignored_rows",
            "test_cross_entropy_input_grad.py",
        ],
    ),
    (
        "autocast keeps the 16-bit dtype",
        "cross_entropy.py",
        "        return torch.float32\n",
        "        return logits.dtype\n",
        ["test_cross_entropy_autocast.py::test_autocast_value_and_dtype_match_f_cross_entropy"],
    ),
    (
        "shared inputs= not detected",
        "cross_entropy.py",
        'if any("g" in u for u in peers if u is not upstream):',
        "if False:",
        ["test_cross_entropy_autograd.py::test_inputs_shared_by_two_accumulate_calls_raises"],
    ),
    (
        "rejected batch still scales input grads",
        "cross_entropy.py",
        "& (g != 0) & (status == 0)",
        "& (g != 0)",
        ["test_cross_entropy_input_grad.py", "test_cross_entropy_bad_input.py"],
    ),
    (
        "reduction none not reshaped",
        "cross_entropy.py",
        "out = loss.reshape(targets.shape)",
        "out = loss",
        ["test_cross_entropy.py", "test_integrations.py"],
    ),
    (
        "linear loss keeps the 16-bit dtype under autocast",
        "linear_cross_entropy.py",
        "            out_dtype = torch.float32\n",
        "            pass\n",
        ["test_linear_cross_entropy.py::test_autocast_matches_f_linear_and_cross_entropy"],
    ),
    (
        "linear ops without an autocast kernel",
        "_ops/linear_cross_entropy.py",
        '    _lib.impl("linear_ce_backward", _bwd, _key)\n',
        "",
        ["test_linear_cross_entropy.py::test_float32_head_inside_an_autocast_region"],
    ),
    (
        "linear double backward allowed",
        "_ops/linear_cross_entropy.py",
        "    if torch.is_grad_enabled() and not torch.compiler.is_compiling():",
        "    if False:",
        ["test_linear_cross_entropy.py::test_double_backward_is_refused"],
    ),
    (
        "linear options' mean scaled by the row count again",
        "_ops/linear_cross_entropy.py",
        "    if ctx.reduction == 1 and not ctx.with_options:",
        "    if ctx.reduction == 1:",
        ["test_linear_cross_entropy_options.py::test_every_option_matches_accumulate_on_f_linear"],
    ),
    (
        "linear options' recomputed mean with one denominator",
        "_ops/linear_cross_entropy.py",
        "    return (scale / wsum).expand(n), (scale / count.to(scale.dtype)).expand(n)",
        "    return (scale / wsum).expand(n), None",
        ["test_linear_cross_entropy_options.py::test_retained_graph_second_backward"],
    ),
    (
        "linear options record the options' loss",
        "linear_cross_entropy.py",
        "    nll = (nll if options else loss).detach()",
        "    nll = loss.detach()",
        ["test_linear_cross_entropy_options.py::test_statistics_are_the_models_own"],
    ),
    (
        "fused trainer drops Gemma's soft-capping",
        "integrations/huggingface.py",
        "bias=bias, reduction=reduction, softcap=softcap",
        "bias=bias, reduction=reduction",
        ["test_linear_cross_entropy_integrations.py::test_fused_trainer_takes_softcap_and_logit_scale"],
    ),
    (
        "fused trainer multiplies by Granite's logits_scaling",
        "integrations/huggingface.py",
        'return (value if kind == "multiply" else 1.0 / value), None',
        "return value, None",
        ["test_linear_cross_entropy_integrations.py::test_fused_trainer_takes_softcap_and_logit_scale"],
    ),
    # input validation
    (
        "overflow explained as NaN / inf logits",
        "_validate.py",
        "if torch.isfinite(exact[row]):",
        "if False:",
        ["test_cross_entropy_inputs.py::test_finite_logits_whose_loss_overflows_float32"],
    ),
    (
        "float ignore_index accepted",
        "_validate.py",
        'return as_int(ignore_index, "ignore_index")',
        "return int(ignore_index)",
        ["test_cross_entropy_inputs.py::test_numpy_integer_ignore_index"],
    ),
    (
        "calls under torch.func transforms buffered",
        "_validate.py",
        "    if any(isinstance(t, torch.Tensor) and wrapped(t) for t in tensors):",
        "    if False:",
        ["test_tracker.py::test_rejected_call_under_a_transform_leaves_no_row"],
    ),
    (
        "meta device adopted",
        "tracker.py",
        'if device.type == "meta":',
        "if False:",
        ["test_cross_entropy_inputs.py::test_meta_first_batch_leaves_tracker_usable"],
    ),
    (
        "deferred errors dropped",
        "tracker.py",
        "self._errors.bitwise_or_(status)",
        "pass",
        ["test_cross_entropy_bad_input.py", "test_cross_entropy_ops.py::test_compiled_step_defers_errors"],
    ),
    (
        "no tracker lock",
        "tracker.py",
        "else self._lock",
        "else contextlib.nullcontext()",
        ["test_tracker.py::test_concurrent_accumulate_loses_no_rows"],
    ),
    # checkpoints (memcore/_checkpoint.py)
    (
        "load with weights_only=False",
        "_checkpoint.py",
        'map_location="cpu", weights_only=True',
        'map_location="cpu", weights_only=False',
        LOAD,
    ),
    (
        "load_state_dict accepts negative epochs",
        "_checkpoint.py",
        'epochs = _int(state, "epochs", 0, S.MAX_EPOCHS)',
        'epochs = _int(state, "epochs", -(10**9), S.MAX_EPOCHS)',
        LOAD,
    ),
    (
        "load_state_dict skips history length",
        "_checkpoint.py",
        "or len(hist) != want_len:",
        ":  # noqa",
        LOAD,
    ),
    ("load_state_dict skips buffer ranges", "_checkpoint.py", "if not bool(ok(bufs[k])):", "if False:", LOAD),
    (
        "load_state_dict skips correct <= rows",
        "_checkpoint.py",
        "& (t[:, S.C_CORRECT] <= t[:, S.C_ROWS]).all()",
        "",
        LOAD,
    ),
    (
        "load_state_dict accepts NaN sums",
        "_checkpoint.py",
        '    out.append(("sums", _finite_sums, _FINITE_SUMS))\n',
        "",
        LOAD,
    ),
    (
        "load_state_dict swaps before checking",
        "tracker.py",
        "        with self._locked():\n            self._assign(\n",
        "        with self._locked():\n            self._set_buffers({k: v.clone() for k, v in state.get('buffers', {}).items()"
        " if isinstance(v, torch.Tensor)})\n            self._assign(\n",
        LOAD,
    ),
    (
        "format-1 state converted unchecked",
        "_checkpoint.py",
        "        _check(state, 1, num_samples, 0, num_samples)\n",
        "",
        ["test_checkpoint.py::test_load_of_a_bad_format_1_state_is_atomic", "test_tracker.py"],
    ),
    (
        "per-process temporary file",
        "_checkpoint.py",
        'fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")',
        'tmp = f"{path}.tmp{os.getpid()}"; fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)',
        ["test_checkpoint.py::test_concurrent_saves_to_one_path"],
    ),
    (
        "cut checkpoint file raises torch.load's own error",
        "_checkpoint.py",
        "except Exception as e:  # noqa: BLE001  (a cut or foreign file",
        "except EOFError as e:  # noqa: BLE001  (a cut or foreign file",
        ["test_checkpoint.py::test_load_of_a_cut_or_foreign_file_names_it", *SHARD],
    ),
    # sharded checkpoints
    (
        "shard reload with an empty range",
        "_checkpoint.py",
        "if lo >= hi and (start < end or parts):",
        "if lo >= hi:",
        SHARD,
    ),
    (
        "old shard files not removed on re-save",
        "_checkpoint.py",
        'if name.startswith("shard-") and name.endswith(".pt") and name not in files:',
        "if False:",
        SHARD,
    ),
    (
        "shard slices unchecked",
        "_checkpoint.py",
        "            _check(part, VERSION, num_samples, lo, hi)\n",
        "",
        SHARD,
    ),
    (
        "sharded load without agreement",
        "tracker.py",
        "            if not _checkpoint.all_ok(err is None, dev):",
        "            if err is None or not _checkpoint.all_ok(False, dev):",
        SHARD,
    ),
    # the distributed protocol (memcore/_shard.py)
    (
        "rank settings unchecked",
        "_shard.py",
        "        if not same:\n",
        "        if False:\n",
        [DIST + "test_ranks_with_different_num_samples_get_a_clear_error"],
    ),
    (
        "isnan all -> any in the agreement check",
        "_shard.py",
        "same = torch.isnan(col).all() or",
        "same = torch.isnan(col).any() or",
        [DIST + "test_ranks_with_different_tau_get_a_clear_error"],
    ),
    (
        "rank epochs unchecked",
        "_shard.py",
        "    lo, hi = -h[_H_EPOCHS + 1], h[_H_EPOCHS]\n    if lo != hi:",
        "    lo, hi = -h[_H_EPOCHS + 1], h[_H_EPOCHS]\n    if False:",
        [DIST + "test_ranks_with_different_epoch_counts_get_a_clear_error"],
    ),
    (
        "ranks in different calls unchecked",
        "_shard.py",
        "    lo, hi = -h[_H_KIND + 1], h[_H_KIND]\n    if lo != hi:",
        "    lo, hi = -h[_H_KIND + 1], h[_H_KIND]\n    if False:",
        [DIST + "test_ranks_in_different_calls_get_a_clear_error"],
    ),
    (
        "flush collective with nothing buffered",
        "tracker.py",
        "            if not (collective or router.pending()):",
        "            if False:",
        [DIST + "test_checkpoint_and_scores_on_rank_0_alone"],
    ),
    (
        "ReduceOp.MAX -> MIN when opening an epoch",
        "_shard.py",
        "        dist.all_reduce(t, op=dist.ReduceOp.MAX)\n    return bool(t.item())",
        "        dist.all_reduce(t, op=dist.ReduceOp.MIN)\n    return bool(t.item())",
        SHARD,
    ),
    (
        "mixed ignore_index with a rejected buffered batch",
        "_shard.py",
        "keep = torch.cat([r[1] != r[5] for r in rows]) & (status == 0)",
        "keep = torch.cat([r[1] != r[5] for r in rows])",
        ["test_tracker.py::test_rejected_batch_among_batches_of_other_ignore_index_records_nothing"],
    ),
    (
        "DDP grad rows not committed",
        "tracker.py",
        "S.commit_grad(self._st, gidx - self._start, gvals[:, 0], torch.ones_like(gidx))",
        "pass",
        [DIST + "test_input_gradient_statistics_are_merged_across_ranks"],
    ),
    # export (memcore/export.py)
    (
        "negative top accepted",
        "export.py",
        'top = as_int(top, "top (how many indices to keep)", minimum=0)',
        'top = as_int(top, "top (how many indices to keep)")',
        ["test_export.py::test_ranked_issues_refuses_negative_top"],
    ),
    (
        "to_csv unchecked labels",
        "export.py",
        "    ids, lab_t = _columns(scores, labels)\n",
        "    ids, lab_t = np.arange(len(next(iter(scores.values())))), "
        "(None if labels is None else torch.as_tensor(labels))\n",
        ["test_export.py::test_to_csv_checks_lengths_before_writing"],
    ),
    (
        "ranked_issues returns row positions",
        "export.py",
        "    return ids[order if top is None else order[:top]]",
        "    return order if top is None else order[:top]",
        ["test_export.py::test_export_helpers_use_the_scores_sample_ids"],
    ),
    (
        "join_scores row mapping",
        "export.py",
        "take = order[pos] if len(ids) else pos",
        "take = pos",
        ["test_export.py"],
    ),
    (
        "join_scores accepts repeated ids",
        "export.py",
        "    if (counts > 1).any():",
        "    if False:",
        ["test_export.py::test_join_scores_checks_ids_and_lengths"],
    ),
    (
        "read_parquet ordering by id",
        "export.py",
        'order = torch.argsort(cols["index"])',
        'order = torch.arange(len(cols["index"]))',
        ["test_export.py::test_parquet_streams_row_groups_and_round_trips"],
    ),
    (
        "read_parquet reads foreign files",
        "export.py",
        '        if not isinstance(meta, dict) or meta.get("format") != PARQUET_FORMAT:',
        "        if False:",
        ["test_export.py::test_read_parquet_refuses_foreign_files"],
    ),
    (
        "re-export keeps the previous parts",
        "export.py",
        "            stale = _PARQUET_NAME.fullmatch(name) and name not in keep",
        "            stale = False",
        ["test_export.py::test_parquet_re_export_replaces_the_previous_one"],
    ),
    (
        "to_parquet on a shard that owns no ids",
        "tracker.py",
        "for lo in range(0, max(n, 1), rows):",
        "for lo in range(0, n, rows):",
        SHARD,
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
