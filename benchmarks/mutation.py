"""Mutation testing of the modules that carry the product's own logic, with mutmut (too slow for CI).

    python -m benchmarks.mutation --targets settings,inputs          # one scratch copy per target, under /tmp
    python -m benchmarks.mutation --targets all --max-children 2

Each target names the module(s) mutmut mutates and the test files that must kill the mutants. The run works on a
scratch copy of the working tree (tracked and untracked, not ignored files), so the checkout is never touched, and
writes `benchmarks/results/mutation/<target>.json`: counts by outcome, the survival rate, and every surviving mutant
with its diff, so the next reader can kill it with a test or judge it equivalent (`judgements` in the same file,
kept across runs). mutmut 3 switches mutants at call time inside forked test processes, so code that only runs at
import (module-level tables, class bodies such as `GenerationSettings`' `option(...)` declarations) is reported as
surviving: those are judged "import-time" below rather than killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
PACKAGES = ("t2mv", "triposr", "wonder3d_perflow", "benchmarks")

# target -> (modules to mutate, tests that must kill their mutants)
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "settings": (("t2mv/settings.py",), ("tests/test_settings.py",)),
    "inputs": (("t2mv/inputs.py",), ("tests/test_inputs.py", "tests/test_bad_inputs.py")),
    "chain": (("t2mv/chain",), ("tests/test_chain.py", "tests/test_chain_views.py")),
    "views": (
        ("t2mv/views_to_mesh.py", "t2mv/view_texture.py"),
        ("tests/test_views_to_mesh.py", "tests/test_view_texture.py"),
    ),
    "refine": (("t2mv/view_refine.py",), ("tests/test_view_refine.py",)),
    "cli": (("t2mv/cli_common.py",), ("tests/test_cli.py", "tests/test_bad_inputs.py")),
}
OUTCOME = re.compile(r"^\s*(\S+): (.+)$")


def _scratch_copy(target: str) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored) copied under /tmp."""
    dest = Path(os.environ.get("TMPDIR", "/tmp")) / "t2mv-mutation" / target
    shutil.rmtree(dest, ignore_errors=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _config(modules: tuple[str, ...], tests: tuple[str, ...]) -> str:
    lines = ["[mutmut]", "source_paths=", *[f"    {m}" for m in modules], "also_copy="]
    lines += [f"    {p}" for p in PACKAGES]
    lines += ["pytest_add_cli_args_test_selection=", *[f"    {t}" for t in tests]]
    lines += ["pytest_add_cli_args=", "    -p", "    no:cacheprovider", ""]
    return "\n".join(lines)


def run_target(target: str, max_children: int, timeout_s: int) -> dict:
    modules, tests = TARGETS[target]
    work = _scratch_copy(target)
    (work / "setup.cfg").write_text(_config(modules, tests))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NUMBA_DISABLE_JIT": "1"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    mutmut = str(Path(sys.executable).parent / "mutmut")
    start = time.perf_counter()
    done = subprocess.run(
        [mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, capture_output=True, timeout=timeout_s
    )
    seconds = time.perf_counter() - start
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    outcomes = dict(m.groups() for m in map(OUTCOME.match, listing.stdout.splitlines()) if m)
    survivors = sorted(k for k, v in outcomes.items() if v == "survived")
    counts: dict[str, int] = {}
    for v in outcomes.values():
        counts[v] = counts.get(v, 0) + 1
    diffs = {
        name: subprocess.run([mutmut, "show", name], cwd=work, env=env, capture_output=True, text=True).stdout
        for name in survivors
    }
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "target": target,
        "modules": list(modules),
        "tests": list(tests),
        "commit": commit,
        "dirty": bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True).stdout),
        "mutmut_exit_code": done.returncode,
        "seconds": round(seconds, 1),
        "counts": counts,
        "total": len(outcomes),
        "survival_rate": round(len(survivors) / max(len(outcomes), 1), 4),
        "survivors": diffs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="settings", help=f"comma-separated: {', '.join(TARGETS)} or all")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per target")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.targets == "all" else args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        record = run_target(name, args.max_children, args.timeout)
        path = RESULTS / f"{name}.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        record["judgements"] = previous.get("judgements", {})  # hand-written: why a survivor is equivalent
        record["history"] = [*previous.get("history", []), _history_row(record)]
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {record['counts']} survival {record['survival_rate']:.1%} ({record['seconds']} s) -> {path}")
    return 0


def _history_row(record: dict) -> dict:
    return {k: record[k] for k in ("commit", "dirty", "total", "counts", "survival_rate", "seconds")}


if __name__ == "__main__":
    sys.exit(main())
