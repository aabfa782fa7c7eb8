"""Batch: prompt files, folder names, sharding, resume, summaries, claims (two runs on one folder share the work);
a 2-process sharded run equal to 1 process, and two independent processes on one folder doing each prompt once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import t2mv.batch
from t2mv.batch import (
    CLAIMS_DIR,
    COMPLETE_MARKER,
    SUMMARY_NAME,
    BatchSummary,
    claim,
    folder_name,
    parse_prompts,
    read_prompts,
    run_batch,
    shard,
    slugify,
    write_summary,
)
from t2mv.chain import ChainResult
from t2mv.settings import GenerationSettings

REPO = Path(__file__).resolve().parents[1]


class FakeChain:
    """Test double for TextTo3D: images are a function of (prompt, seed); records its calls; can fail on cue.

    Like the chain, it writes its result into `output_dir` (the stage files and settings.json).
    """

    def __init__(self, fail_on=()):
        self.calls = []
        self.fail_on = set(fail_on)

    def settings_for(self, settings=None, **options):
        return (settings or GenerationSettings.smoke()).with_changes(**options).validate()

    def __call__(self, prompt, *, negative_prompt=None, settings, multiview=True, mesh=True, output_dir=None, **kw):
        self.calls.append((prompt, negative_prompt, settings.seed, settings))
        if prompt in self.fail_on:
            raise ValueError(f"cannot do {prompt!r}")
        rng = np.random.default_rng(settings.seed + len(prompt))
        views = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(12)]
        result = ChainResult(
            image=views[0],
            mv_input=views[1],
            normals=views[:6],
            colors=views[6:],
            view_names=tuple(f"v{i}" for i in range(6)),
            settings={"prompt": prompt, "negative_prompt": negative_prompt, **settings.to_dict()},
            timings={"total": 0.01},
        )
        if output_dir is not None:
            result.save(output_dir)
        return result


def test_text_and_jsonl_lines_seeds_and_negative_prompts():
    lines = [
        "# a comment",
        "a red teapot",
        "",
        '{"prompt": "a blue mug", "seed": 99}',
        '{"prompt": "a chair", "negative_prompt": "blurry"}',
        "  a dog  ",
    ]
    specs = parse_prompts(lines, base_seed=10, negative_prompt="ugly")
    assert [s.index for s in specs] == [0, 1, 2, 3]
    assert [s.prompt for s in specs] == ["a red teapot", "a blue mug", "a chair", "a dog"]
    assert [s.seed for s in specs] == [10, 99, 12, 13]  # base seed + prompt index, unless the line sets one
    assert [s.negative_prompt for s in specs] == ["ugly", "ugly", "blurry", "ugly"]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "x", "steps": 4}', "unknown key"),
        ('{"prompt": "x"', "not valid JSON"),
        ('{"prompt": ""}', "missing or empty"),
        ('{"prompt": "x", "seed": -3}', "seed must be an integer in"),
        ('{"prompt": "x", "seed": "7"}', "seed must be an integer in"),
        ('{"prompt": "x", "seed": 4294967296}', r"seed must be an integer in \[0, 4294967295\]"),
        ('{"prompt": "x", "negative_prompt": 3}', "negative_prompt must be a string"),
    ],
)
def test_bad_lines_name_the_line(line, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_prompts(["fine", line], source="p.jsonl")
    assert "p.jsonl, line 2" in str(info.value)


def test_empty_or_missing_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "absent.txt")


def test_folder_names_are_safe_stable_and_unique():
    assert slugify("A Red Teapot!  (glossy)") == "a-red-teapot-glossy"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Crème brûlée") == "creme-brulee"
    assert slugify("日本語") == "prompt"
    assert len(slugify("x" * 500)) <= 48
    name = folder_name("a red teapot", None, 0)
    assert name == folder_name("a red teapot", None, 0)  # stable across runs and processes
    assert name.startswith("a-red-teapot-") and len(name.rsplit("-", 1)[1]) == 8
    assert name != folder_name("a red teapot", None, 1) != folder_name("a red teapot", "blurry", 0)
    specs = parse_prompts(['{"prompt": "same", "seed": 1}'] * 3 + ["../same?"])
    names = [s.folder for s in specs]
    assert len(set(names)) == 4 and all("/" not in n and ".." not in n for n in names)


def test_shards_cover_every_prompt_exactly_once():
    specs = parse_prompts([f"prompt {i}" for i in range(11)])
    for n in (1, 2, 3, 4, 16):
        indices = [s.index for k in range(n) for s in shard(specs, k, n)]
        assert sorted(indices) == list(range(11))
    with pytest.raises(ValueError):
        shard(specs, 2, 2)


def test_run_writes_folders_and_resumes(tmp_path):
    specs = parse_prompts(["a red teapot", "a blue mug", "a chair"], base_seed=5)
    chain = FakeChain()
    summary = run_batch(chain, specs, tmp_path, progress=False, mv_steps=4)
    assert summary.done == [0, 1, 2] and summary.skipped == [] and not summary.failed
    assert [c[2] for c in chain.calls] == [5, 6, 7] and chain.calls[0][3].mv_steps == 4
    folder = tmp_path / specs[1].folder
    names = {p.name for p in folder.iterdir()}
    assert {"image.png", "mv_input.png", "normals.png", "colors.png", "settings.json", COMPLETE_MARKER} <= names
    assert len([n for n in names if n.startswith(("normal_", "color_"))]) == 12
    assert json.loads((folder / COMPLETE_MARKER).read_text())["prompt"] == "a blue mug"

    # Interrupted prompt: its folder exists without the marker (and with a stale file): redone from nothing.
    (folder / COMPLETE_MARKER).unlink()
    (folder / "stale.tmp").write_text("half-written")
    again = run_batch(chain, specs, tmp_path, progress=False)
    assert again.done == [1] and again.skipped == [0, 2]
    assert not (folder / "stale.tmp").exists() and (folder / COMPLETE_MARKER).exists()
    assert len(chain.calls) == 4


def test_a_failing_prompt_is_reported_and_the_rest_goes_on(tmp_path):
    specs = parse_prompts(["good one", "bad one", "good two"])
    summary = run_batch(FakeChain(fail_on={"bad one"}), specs, tmp_path, progress=False)
    assert summary.done == [0, 2] and list(summary.failed) == [1] and "cannot do" in summary.failed[1]
    assert not (tmp_path / specs[1].folder / COMPLETE_MARKER).exists()
    path = write_summary(specs, tmp_path, summary)
    record = json.loads(path.read_text())
    assert path.name == SUMMARY_NAME and record["complete"] == 2 and record["failed"] == 1
    assert [row["status"] for row in record["prompts"]] == ["complete", "failed", "complete"]
    merged = BatchSummary(total=3, done=[2]).merge(BatchSummary(total=3, done=[0], skipped=[1]))
    assert merged.done == [0, 2] and merged.skipped == [1] and "3 prompts: 2 generated" in merged.line()


class InterleavingChain(FakeChain):
    """On its first prompt, with that prompt's folder half-written, runs `during()` (another batch on the folder)."""

    def __init__(self, folder, during):
        super().__init__()
        self.folder, self.during = folder, during

    def __call__(self, prompt, **kwargs):
        if not self.calls:
            self.folder.mkdir(parents=True)
            (self.folder / "partial.png").write_bytes(b"written by the first process, still working")
            self.during()
        return super().__call__(prompt, **kwargs)


def test_a_second_run_passes_over_claimed_prompts_and_keeps_their_folders(tmp_path):
    """While run A makes prompt 0, run B on the same folder makes 1 and 2, and neither redoes nor deletes."""
    specs = parse_prompts(["a red teapot", "a blue mug", "a chair"])
    second, seen = FakeChain(), {}

    def run_second():
        seen["summary"] = run_batch(second, specs, tmp_path, progress=False)
        seen["partial_kept"] = (tmp_path / specs[0].folder / "partial.png").exists()
        seen["record"] = json.loads(write_summary(specs, tmp_path, seen["summary"]).read_text())

    first = InterleavingChain(tmp_path / specs[0].folder, run_second)
    summary = run_batch(first, specs, tmp_path, progress=False)

    b = seen["summary"]
    assert b.elsewhere == [0] and b.done == [1, 2] and not b.failed and "1 being made by another process" in b.line()
    assert seen["partial_kept"], "the second run deleted the first run's unfinished folder"
    assert [row["status"] for row in seen["record"]["prompts"]] == ["in_progress", "complete", "complete"]
    assert summary.done == [0] and summary.skipped == [1, 2]  # found finished once the first prompt was done
    assert [c[0] for c in first.calls] == ["a red teapot"]
    assert [c[0] for c in second.calls] == ["a blue mug", "a chair"]
    assert all((tmp_path / s.folder / COMPLETE_MARKER).is_file() for s in specs)
    assert (tmp_path / specs[0].folder / "partial.png").exists()
    record = json.loads(write_summary(specs, tmp_path, summary.merge(b)).read_text())
    assert record["complete"] == 3 and record["in_progress"] == 0


def test_a_claim_is_free_again_after_release_and_a_dead_runs_folder_is_redone(tmp_path):
    specs = parse_prompts(["a red teapot"])
    lock = claim(tmp_path, specs[0])
    assert lock is not None and claim(tmp_path, specs[0]) is None  # held: a second claim fails at once
    held = run_batch(FakeChain(), specs, tmp_path, progress=False)
    assert held.elsewhere == [0] and not held.done
    lock.release()
    (tmp_path / specs[0].folder).mkdir()
    (tmp_path / specs[0].folder / "stale.png").write_text("left by a process that died")
    again = run_batch(FakeChain(), specs, tmp_path, progress=False)
    assert again.done == [0] and not (tmp_path / specs[0].folder / "stale.png").exists()


def test_a_failed_completion_marker_fails_that_prompt_only(tmp_path, monkeypatch):
    """Writing COMPLETE.json can fail (full disk): that prompt is reported failed, unmarked; the batch goes on."""
    specs = parse_prompts(["a red teapot", "a blue mug"])
    real = t2mv.batch.write_text

    def full_disk_for_the_first(text, path):
        if path.name == COMPLETE_MARKER and specs[0].folder in str(path):
            raise OSError(28, "No space left on device")
        return real(text, path)

    monkeypatch.setattr(t2mv.batch, "write_text", full_disk_for_the_first)
    summary = run_batch(FakeChain(), specs, tmp_path, progress=False)
    assert list(summary.failed) == [0] and "No space left" in summary.failed[0] and summary.done == [1]
    assert not (tmp_path / specs[0].folder / COMPLETE_MARKER).exists()
    assert (tmp_path / specs[1].folder / COMPLETE_MARKER).exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root):
    # Everything but the run-dependent records (wall-clock timings, the completion marker's seconds, summary).
    # The claims' lock files are empty and belong to no prompt's output.
    skip = {"timings.json", COMPLETE_MARKER, SUMMARY_NAME}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(root): p for p in files if p.relative_to(root).parts[0] != CLAIMS_DIR}


def test_two_processes_shard_the_batch_and_match_one_process(tmp_path):
    """Smoke mode, CPU: a 2-process run (torchrun, gloo) writes exactly the files of a 1-process run."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('a red teapot\n{"prompt": "a blue mug", "seed": 42}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "T2MV_SMOKE": "1"}
    common = [
        "batch",
        str(prompts),
        "--mesh",
        "--format",
        "glb",
        "ply",
        "--no-progress",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "t2mv.cli", *common, "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "t2mv.cli",
            *common,
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "2 prompts: 2 generated" in sharded.stdout and "SMOKE MODE" in sharded.stderr

    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys() and len({p.parts[0] for p in one}) == 2
    assert any(p.name == "mesh.glb" for p in one)
    for name, path in one.items():
        assert path.read_bytes() == two[name].read_bytes(), f"{name} differs between 1 and 2 processes"
    summary = json.loads((tmp_path / "two" / SUMMARY_NAME).read_text())
    assert summary["complete"] == 2 and [row["seed"] for row in summary["prompts"]] == [3, 42]
    processes = [
        json.loads((tmp_path / "two" / row["folder"] / COMPLETE_MARKER).read_text())["process"]
        for row in summary["prompts"]
    ]
    assert processes == ["0/2", "1/2"]  # prompt 0 went to process 0, prompt 1 to process 1


def test_two_independent_processes_on_one_folder_make_each_prompt_once(tmp_path):
    """Smoke mode, CPU: two `t2mv batch` processes started together on one output folder share the prompts."""
    prompts = tmp_path / "prompts.txt"
    names = ["a red teapot", "a blue mug", "a chair"]
    prompts.write_text("\n".join(names) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "T2MV_SMOKE": "1"}
    command = [sys.executable, "-m", "t2mv.cli", "batch", str(prompts), "-o", str(tmp_path / "out")]
    command += ["--no-progress", "--device", "cpu"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0 and "Traceback" not in err, err[-3000:]
    generated = [int(out.split("prompts: ", 1)[1].split(" generated")[0]) for out, _ in outputs]
    assert sum(generated) == len(names), outputs  # every prompt made exactly once, by one of the two
    print(f"prompts made by each process: {generated}")

    specs = read_prompts(prompts)
    markers = [json.loads((tmp_path / "out" / s.folder / COMPLETE_MARKER).read_text()) for s in specs]
    assert [m["prompt"] for m in markers] == names
    makers = {run.pid: sum(m["pid"] == run.pid for m in markers) for run in runs}
    assert sorted(makers.values()) == sorted(generated), makers  # each marker names the process that made it
    for spec in specs:  # whole folders: nothing of one process's work deleted by the other
        files = {p.name for p in (tmp_path / "out" / spec.folder).iterdir()}
        assert {"image.png", "normals.png", "colors.png", "settings.json", COMPLETE_MARKER} <= files
        assert len([n for n in files if n.startswith(("normal_", "color_"))]) == 12
    assert json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["complete"] == len(names)


def test_a_batch_with_candidates_records_each_prompts_automatic_choice(tmp_path):
    from t2mv.chain import TextTo3D

    chain = TextTo3D.tiny(0, stages=("text_to_image",))
    specs = parse_prompts(["a red teapot", "a blue mug"], base_seed=3)
    summary = run_batch(chain, specs, tmp_path, progress=False, candidates=2)
    assert summary.done == [0, 1]
    for spec in specs:
        folder = tmp_path / spec.folder
        assert (folder / "candidate_0.png").is_file() and (folder / "candidate_1.png").is_file()
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["candidates"] == 2 and settings["chosen_by"] == "score"
        assert settings["candidate_seeds"] == [spec.seed, spec.seed + 1]
        assert json.loads((folder / COMPLETE_MARKER).read_text())["chosen"] == settings["chosen"]
        assert len(json.loads((folder / "info.json").read_text())["candidate_scores"]) == 2
