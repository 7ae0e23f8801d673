"""The GPU calls' parts that run without a GPU (DEVELOPMENT.md, "GPU runs"): the shell scripts parse
and say why they stop where no GPU is visible; tools/deadline.py skips what has not started once the
deadline has passed; tools/launch_all.py has a case for every registered op, dtype and launch route,
and every case runs; tools/gpu_repeat.py repeats on the CPU and names what differs; tools/gpu_bench.py
writes every case with --small and refuses the full shapes; tools/gpu_store.py turns what the calls
write into store rows that render; tests/conftest.py marks every CUDA test for ``-m cuda``."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


SCRIPTS = sorted(
    str(p.relative_to(ROOT)) for folder in ("scripts", "tools") for p in (ROOT / folder).glob("*.sh")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _pytest_with_deadline(tmp_path, deadline):
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    env = dict(os.environ, MEMCORE_DEADLINE=str(deadline), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tools.deadline", "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_deadline_skips_tests_not_started(tmp_path):
    late = _pytest_with_deadline(tmp_path, time.time() - 1)
    assert late.returncode == 0, late.stdout + late.stderr
    assert "2 skipped" in late.stdout and "past the run's deadline" in late.stdout
    early = _pytest_with_deadline(tmp_path, time.time() + 3600)
    assert early.returncode == 0 and "2 passed" in early.stdout, early.stdout + early.stderr


@pytest.mark.slow
def test_gpu_bench_small_writes_every_case(tmp_path):
    from tools import gpu_bench

    out = tmp_path / "results.jsonl"
    assert gpu_bench.main(["--small", "--rounds", "1", "--skip", "torch.compile", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in recs if "error" in r or "skipped" in r], recs
    assert recs[0]["case"] == "setup" and recs[0]["small"] is True
    classes = {r["case"] for r in recs if "passes" in r and r["case"] in gpu_bench.SHAPES}
    assert classes == set(gpu_bench.SHAPES)
    for cls in gpu_bench.SHAPES:
        variants = [r["variant"] for r in recs if r["case"] == cls]
        assert variants[:2] == ["copy", "forward"] and variants[-2:] == ["fwd+bwd", "overwrite"], variants
        for r in recs:
            if r["case"] == cls and "loss_err" in r:  # fp32 on the CPU: the kernels' own error bound
                assert r["loss_err"] < 1e-4, r
    split = [r for r in recs if r["case"] == "split launch"]
    assert split[0]["slices"] > 1 and "forward, split off" in [r["variant"] for r in split]
    lin = [r for r in recs if r["case"] == "linear-CE"]
    assert [r["variant"] for r in lin] == ["plain", "memcore"] and lin[1]["shape"] == "256x64x1001"
    for key in ("loss_err", "grad_hidden_err", "grad_weight_err"):
        assert lin[1][key] < 1e-5, (key, lin[1][key])
    acc = {(r["shape"], r["variant"]) for r in recs if r["case"] == "accumulate"}
    assert ("64x4001", "memcore overwrite") in acc and ("64x1000", "F.cross_entropy") in acc


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_gpu_bench_without_gpu_says_so(tmp_path, capsys):
    from tools import gpu_bench

    out = tmp_path / "results.jsonl"
    assert gpu_bench.main(["--out", str(out)]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not out.exists()  # nothing measured, nothing written


def test_gpu_bench_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    from tools import gpu_bench

    out = tmp_path / "results.jsonl"
    args = ["--small", "--rounds", "1", "--out", str(out), "--deadline", str(time.time() + 3)]
    assert gpu_bench.main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = [r["case"] for r in recs if "skipped" in r]
    assert "torch.compile" in skipped and all(
        "before the deadline" in r["skipped"] for r in recs if "skipped" in r
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages shown where no GPU is visible")
@pytest.mark.parametrize("call", ["check", "bench"])
def test_gpu_call_without_gpu_says_why_it_stops(tmp_path, call):
    """With a CPU torch and no MEMCORE_CUDA_ARCH, a call stops at its build and says why, leaving its
    records: the call's log, the stage records and the environment."""
    env = dict(os.environ, OUT=str(tmp_path), MEMCORE_PY=sys.executable, MEMCORE_GPU_BUDGET="120")
    env.pop("MEMCORE_CUDA_ARCH", None)
    r = subprocess.run(["bash", str(ROOT / f"tools/gpu_{call}.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stdout + r.stderr
    assert (
        "no GPU visible" in r.stdout and "MEMCORE_CUDA_ARCH unset" in (tmp_path / f"{call}.log").read_text()
    )
    stages = [json.loads(line) for line in (tmp_path / f"{call}-stages.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["exit"], s["state"]) for s in stages] == [("build", 3, "failed")]
    env_json = json.loads((tmp_path / "env.json").read_text())
    assert env_json["torch"] == torch.__version__ and "gpu" not in env_json and len(env_json["tree"]) == 16


def test_build_stamp_follows_the_sources_by_content(tmp_path):
    """The calls skip their build when memcore/_C was built from the same csrc/, setup.py and
    architecture: judged by content, so a fresh copy of the tree (every file's time renewed) still
    counts as built, and any edit or another architecture does not."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools/gpu_common.sh").write_text((ROOT / "tools/gpu_common.sh").read_text())
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc/k.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "setup.py").write_text("")

    def sources(arch="9.0"):
        env = dict(os.environ, OUT=str(tmp_path / "out"), MEMCORE_CUDA_ARCH=arch)
        script = "call=x; budget=1; source tools/gpu_common.sh; sources"
        r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and len(r.stdout.strip()) == 16, r.stdout + r.stderr
        return r.stdout.strip()

    first = sources()
    os.utime(tmp_path / "csrc/k.cu", (time.time() + 60, time.time() + 60))
    assert sources() == first
    assert sources("8.0") != first
    (tmp_path / "csrc/k.cu").write_text("__global__ void k() { }\n")
    assert sources() != first


def test_launch_all_covers_every_op_dtype_and_route():
    from tools import launch_all

    assert set(launch_all.OPS) == set(launch_all.registered_ops())
    assert set(launch_all.DTYPES) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    kernels = launch_all.global_kernels()
    assert {"ce_forward_kernel", "ce_split_forward_kernel", "probe_reduce_kernel"} <= set(kernels)
    for op in ("ce_forward", "ce_forward_reduce", "ce_forward_grad_", "ce_backward"):
        assert set(launch_all.OPS[op]) == set(launch_all.CE_ROUTES)
    # each route lands on its launch shape on a 132-SM (H100, H200) and a 108-SM (A100) GPU
    for sms in (108, 132):
        for route in launch_all.CE_ROUTES:
            for dtype in launch_all.DTYPES:
                want = "warp" if route.startswith("warp") else route
                assert launch_all.ce_route_on(route, dtype, sms) == want, (route, dtype, sms)


def test_launch_all_runs_every_case_on_the_cpu(capsys):
    from tools import launch_all

    assert launch_all.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    n = sum(len(routes) for routes in launch_all.OPS.values()) * len(launch_all.DTYPES)
    assert out.count("[launch_all] ok ") == n and f"{n}/{n} cases on cpu" in out


def test_gpu_repeat_on_the_cpu_and_across_processes(tmp_path):
    from tools import gpu_repeat

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert gpu_repeat.main(["--small", "--out", str(a)]) == 0
    assert gpu_repeat.main(["--small", "--out", str(b), "--compare", str(a)]) == 0
    recs = [json.loads(line) for line in b.read_text().splitlines()]
    assert recs and all(r["repeat"] and r["across_processes"] for r in recs)
    assert {r["case"].split()[1] for r in recs if r["case"].startswith("tracker")} == {
        "default",
        "overwrite",
        "linear",
    }
    # a digest that differs is named, with the outputs it covers
    first = json.loads(a.read_text().splitlines()[0])
    first["digest"]["mean.out"] = "0" * 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(first) + "\n")
    assert gpu_repeat.main(["--small", "--out", str(tmp_path / "c.jsonl"), "--compare", str(bad)]) == 1
    c = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert c["across_processes"] is False and c["differ_across"] == ["mean.out"]


def test_sass_report_split_slices_is_the_kernels():
    """tools/sass_report.py's copy of the split decision (for its bytes-in-flight model) against the
    compiled one."""
    import memcore
    from tools import sass_report

    for sms in (108, 132, 148):
        for n in (1, 4, 16, 64, 107, 131, 132, 200):
            for c in (1000, 8192, 16384, 50257, 256000):
                for esize in (2, 4, 8):
                    assert sass_report.split_slices(n, c, esize, sms) == memcore._C._ce_split_slices(
                        n, c, esize, sms
                    ), (n, c, esize, sms)


def test_gpu_store_rows_render(tmp_path):
    """What the calls write (a --small bench run, a repeat run, a JUnit report, compute-sanitizer's
    summary lines) becomes store rows of suite gpu that RESULTS.md renders, its goals judged."""
    from benchmarks import render
    from tools import gpu_bench, gpu_repeat, gpu_store

    out = tmp_path / "out"
    out.mkdir()
    gpu_bench.main(["--small", "--rounds", "1", "--skip", "torch.compile", "linear", "accumulate",
                    "--out", str(out / "results.jsonl")])  # fmt: skip
    gpu_repeat.main(["--small", "--out", str(out / "repeat-1.jsonl")])
    (tmp_path / "test_one.py").write_text("def test_a():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out}/tests.xml"],
                   cwd=tmp_path, capture_output=True, check=True)  # fmt: skip
    (out / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (out / "racecheck.log").write_text(
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    )
    (out / "env.json").write_text(
        json.dumps(dict(gpu="cpu", torch=torch.__version__, tree=gpu_store.tree_digest()))
    )
    csv = tmp_path / "results.csv"
    assert gpu_store.main([str(out), "--store", str(csv), "--note", "test"]) == 0
    df = render.load(csv)
    assert set(df.suite) == {"gpu"} and set(df.commit) != {"unrecorded"}  # the same code as this checkout
    check = df[df.case == "check"].set_index(["variant", "metric"]).value
    assert check["CUDA tests", "passed"] == 1 and check["CUDA tests", "failed"] == 0
    assert check["bitwise repeats", "differing"] == 0
    assert (
        check["compute-sanitizer memcheck", "errors"] == 0
        and check["compute-sanitizer racecheck", "errors"] == 0
    )
    assert set(gpu_bench.SHAPES) <= set(df.case)
    text = render.render(df)
    assert "## GPU run: checks, and bandwidth per launch shape against the D2D copy" in text
    assert "### split launch" in text and "| forward, split off |" in text
    # the goals are judged on the gpu suite's own rows (here a CPU run stands in: device "cpu")


@pytest.mark.slow
def test_cuda_marker_selects_every_gpu_test(tmp_path):
    """tests/conftest.py gives the cuda marker to tests parametrized with a CUDA device and to tests
    named for CUDA, so ``pytest -m cuda`` (the GPU check) runs them all and nothing else."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('dev', ['cpu', 'cuda:0'])\n"
        "def test_param(dev):\n    pass\n\n"
        "def test_parity_cuda():\n    pass\n\n"
        "def test_plain():\n    pass\n"
    )
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", "-p", "no:cacheprovider"],
                       cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    got = sorted(line.split("::")[1] for line in r.stdout.splitlines() if "::" in line)
    assert got == ["test_param[cuda:0]", "test_parity_cuda"], r.stdout


def _sass(text):
    from tools.sass_report import Instr

    out = []
    for k, line in enumerate(text.strip().splitlines()):
        op, _, rest = line.strip().partition(" ")
        out.append(Instr(16 * k, "", op, rest, ()))
    return out


def test_sass_loads_in_flight_and_the_wait_on_the_first_load():
    """The SASS readings of the bytes-in-flight model: 16-byte loads issued before one of them is
    read; a stream whose first load comes after an instruction that reads the first load's value."""
    from tools import sass_report as sr

    trip = _sass("""
        IADD3 R36, P0, R32, R27, RZ
        LDG.E.128.CONSTANT R20, desc[UR4][R36.64+-0x4000]
        LDG.E.128.CONSTANT R16, desc[UR4][R36.64+-0x2000]
        LDG.E.128.CONSTANT R12, desc[UR4][R36.64]
        FFMA R39, R22, 1.4426950216293334961, R29
        LDG.E.128.CONSTANT R8, desc[UR4][R36.64+0x2000]
        FFMA R16, R8, 1.4426950216293334961, R29
    """)
    assert sr.loads_in_flight(trip, range(len(trip)), 16) == 3  # R22 is the first load's
    kernel = _sass("""
        LDG.E.64 R2, desc[UR4][R4.64]
        ISETP.GE.AND P0, PT, R2, R6, PT
        LDG.E.128 R8, desc[UR4][R10.64]
    """)
    assert sr.waits_for_first_load(kernel, 16) == (1, "ISETP.GE.AND at 0x10")
    kernel[1].operands = "P0, PT, R7, R6, PT"  # the test on another register
    assert sr.waits_for_first_load(kernel, 16) == (0, "")


def test_sass_blocks_per_sm():
    """Occupancy from registers (allocated per warp, 256 at a time), threads and shared memory."""
    from tools.sass_report import blocks_per_sm

    assert blocks_per_sm(64, 512, 0, "90") == 2 and blocks_per_sm(64, 256, 0, "90") == 4
    assert blocks_per_sm(40, 512, 0, "90") == 3  # 40 x 32 = 1280 registers per warp
    assert blocks_per_sm(42, 256, 0, "80") == 5  # 42 rounds up to 48 per thread
    assert blocks_per_sm(16, 256, 0, "90") == 8  # the thread limit, 2048 per SM
    assert blocks_per_sm(16, 32, 0, "90") == 32  # the block limit
    assert blocks_per_sm(32, 256, 60 * 1024, "90") == 3  # 228 KiB of shared memory
