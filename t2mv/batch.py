"""Batch text-to-multiview (and mesh): a prompt file in, one folder per prompt out; resumable and shardable.

A prompt file holds one prompt per line (blank lines and ``#`` comments skipped), or JSON objects per line
(``{"prompt": ..., "negative_prompt": ..., "seed": ...}``; the two kinds may be mixed). Prompt ``i`` (0-based,
counting prompts, not lines) gets seed ``base_seed + i`` unless its line gives one, so its output never depends
on how the file is split across processes.

Each prompt's folder is named from the prompt (a slug plus a short hash of prompt, negative prompt and seed),
so names are stable, file-system safe and unique. A folder is finished when its completion marker
(``COMPLETE_MARKER``) exists; the marker is written last (atomically), so a run that was interrupted leaves a
folder without one, and the next run redoes it while skipping finished ones.

Several runs on one output folder at once (two terminals, two machines on a shared disk, a re-run started while
the first is still going) share the work: a process works on a prompt only while it holds that prompt's claim,
an OS file lock (``filelock``) on ``<output>/.claims/<folder>.lock``. A prompt claimed by another process is
passed over, never redone or deleted; a folder is only cleared when its claim is free and it has no marker, i.e.
its process died. The OS drops a dead process's locks, so nothing needs cleaning up after a crash.

Several GPUs or nodes: run the same command under ``accelerate launch`` or ``torchrun``; process ``k`` of ``n``
takes prompts ``k, k + n, k + 2n, ...`` (each prompt exactly once), and the main process writes the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .inputs import write_text
from .settings import MAX_SEED, GenerationSettings

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE.json"
SUMMARY_NAME = "summary.json"
CLAIMS_DIR = ".claims"
PROMPT_KEYS = ("prompt", "negative_prompt", "seed")
MAX_SLUG = 48


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a batch: its position, text, negative prompt, seed and output folder name."""

    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    folder: str


@dataclass
class BatchSummary:
    """What a batch run did, by prompt index.

    `done`: finished by this run; `skipped`: finished before (or by another process meanwhile); `elsewhere`:
    claimed by another process that was still working on it; `failed`: index → error message.
    """

    total: int = 0
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    elsewhere: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: BatchSummary) -> BatchSummary:
        return BatchSummary(
            total=max(self.total, other.total),
            done=sorted(self.done + other.done),
            skipped=sorted(self.skipped + other.skipped),
            failed={**self.failed, **other.failed},
            elsewhere=sorted(self.elsewhere + other.elsewhere),
            seconds=max(self.seconds, other.seconds),
        )

    def line(self) -> str:
        busy = f"{len(self.elsewhere)} being made by another process, " if self.elsewhere else ""
        return (
            f"{self.total} prompts: {len(self.done)} generated, {len(self.skipped)} already finished (skipped), "
            f"{busy}{len(self.failed)} failed, in {self.seconds:.1f} s"
        )


def slugify(text: str, max_length: int = MAX_SLUG) -> str:
    """Lower-case ASCII letters, digits and single dashes; "prompt" when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "prompt"


def folder_name(prompt: str, negative_prompt: str | None, seed: int) -> str:
    """``<slug>-<8 hex>``: the hash covers prompt, negative prompt and seed, so different settings never collide."""
    key = json.dumps([prompt, negative_prompt, seed], ensure_ascii=False)
    return f"{slugify(prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def parse_prompts(
    lines: Sequence[str], *, base_seed: int = 0, negative_prompt: str | None = None, source: str = "prompts"
) -> list[PromptSpec]:
    """Parse prompt-file lines (plain text or JSON objects) into `PromptSpec`s; ValueError names the bad line."""
    specs: list[PromptSpec] = []
    used: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e}). Use one JSON object or one plain prompt per line."
                ) from None
            unknown = set(entry) - set(PROMPT_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(PROMPT_KEYS)}.")
            prompt = entry.get("prompt")
            negative = entry.get("negative_prompt", negative_prompt)
            seed = entry.get("seed", base_seed + len(specs))
        else:
            prompt, negative, seed = line, negative_prompt, base_seed + len(specs)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: the prompt is missing or empty.")
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{where}: negative_prompt must be a string, got {negative!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"{where}: seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")
        name = folder_name(prompt.strip(), negative, seed)
        base, copy = name, 1
        while name in used:  # the very same prompt, negative prompt and seed twice: keep both, deterministically
            copy += 1
            name = f"{base}-{copy}"
        used.add(name)
        specs.append(PromptSpec(len(specs), prompt.strip(), negative, seed, name))
    if not specs:
        raise ValueError(f"{source}: no prompts found (one prompt per line, or JSON lines with a 'prompt' key).")
    return specs


def read_prompts(path: str | Path, *, base_seed: int = 0, negative_prompt: str | None = None) -> list[PromptSpec]:
    """Read a prompt file (text or JSONL, UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file {path} does not exist. Give a text file with one prompt per line.")
    lines = path.read_text(encoding="utf-8").splitlines()
    return parse_prompts(lines, base_seed=base_seed, negative_prompt=negative_prompt, source=str(path))


def shard(specs: Sequence[PromptSpec], process_index: int, num_processes: int) -> list[PromptSpec]:
    """Prompts ``process_index, process_index + num_processes, ...``: every prompt lands in exactly one shard."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
    return list(specs[process_index::num_processes])


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def claim(output_dir: str | Path, spec: PromptSpec) -> FileLock | None:
    """Take `spec`'s claim in `output_dir` without waiting: the held lock, or None when another process has it.

    Release it with ``lock.release()``. The lock lives as long as the process: a crash frees it.
    """
    claims = Path(output_dir) / CLAIMS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    lock = FileLock(claims / f"{spec.folder}.lock", blocking=False)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def is_claimed(output_dir: str | Path, spec: PromptSpec) -> bool:
    """True when another process holds `spec`'s claim right now (i.e. is making that prompt)."""
    if not (Path(output_dir) / CLAIMS_DIR / f"{spec.folder}.lock").exists():
        return False
    lock = claim(output_dir, spec)
    if lock is None:
        return True
    lock.release()
    return False


def run_batch(
    chain: Any,
    specs: Sequence[PromptSpec],
    output_dir: str | Path,
    *,
    settings: GenerationSettings | None = None,
    mesh: bool = False,
    mesh_formats: Sequence[str] = ("glb",),
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    **options: Any,
) -> BatchSummary:
    """Generate this process's share of `specs` into `output_dir/<spec.folder>/`, skipping finished folders.

    Safe to run in several processes on one `output_dir` at once: each prompt is made by whichever process claims
    it first (see `claim`); the others pass over it.

    Args:
        chain: a `t2mv.chain.TextTo3D`.
        specs: all prompts of the batch (every process passes the same list).
        output_dir: one folder per prompt is made in it.
        settings: the generation settings of every prompt (default: the chain's defaults); each prompt runs with
            its own seed (``spec.seed``) in place of ``settings.seed``. Checked here, before the first prompt.
        mesh: also run the mesh stage and write ``mesh.<fmt>`` for each of `mesh_formats`.
        process_index, num_processes: this process's shard.
        progress: show a progress bar (on the main process).
        options: `GenerationSettings` fields overriding `settings` (``mv_steps=8``).

    Returns:
        What this process did (`BatchSummary`).

    A prompt that fails is logged and counted in the summary; the rest of the batch goes on. Its folder keeps
    whatever was written, without a completion marker, so the next run tries it again.
    """
    started = time.perf_counter()
    base = chain.settings_for(settings, **options)  # BadInputError now, not once per prompt
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = shard(specs, process_index, num_processes)
    summary = BatchSummary(total=len(specs))
    from tqdm.auto import tqdm

    bar = tqdm(
        mine,
        desc=f"batch [process {process_index + 1}/{num_processes}]" if num_processes > 1 else "batch",
        unit="prompt",
        disable=not progress or process_index != 0,
        file=sys.stderr,
    )
    for spec in bar:
        folder = output_dir / spec.folder
        if is_complete(folder):
            summary.skipped.append(spec.index)
            continue
        lock = claim(output_dir, spec)
        if lock is None:  # another process is making it: leave its folder alone
            summary.elsewhere.append(spec.index)
            continue
        try:
            if is_complete(folder):  # finished by another process between the first look and the claim
                summary.skipped.append(spec.index)
                continue
            if folder.exists():  # no marker and nobody holds the claim: its process died; start again from nothing
                shutil.rmtree(folder)
            settings_i = base.with_changes(seed=spec.seed)
            error = _make_one(chain, spec, folder, settings_i, mesh, mesh_formats, f"{process_index}/{num_processes}")
        finally:
            lock.release()
        if error is None:
            summary.done.append(spec.index)
        else:
            summary.failed[spec.index] = error
    summary.seconds = time.perf_counter() - started
    return summary


def _make_one(
    chain: Any,
    spec: PromptSpec,
    folder: Path,
    settings: GenerationSettings,
    mesh: bool,
    mesh_formats: Sequence[str],
    process: str,
) -> str | None:
    """Generate one claimed prompt into `folder` and mark it complete; the error message, or None on success.

    The chain writes each stage's files as the stage ends, so a failure keeps the finished ones (with the chain's
    ``FAILED.json``); without the completion marker the next run makes the prompt again from nothing.
    """
    started = time.perf_counter()
    try:
        result = chain(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            settings=settings,
            multiview=True,
            mesh=mesh,
            output_dir=folder,
            mesh_formats=mesh_formats,
        )
        marker = {
            **asdict(spec),
            "process": process,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seconds": time.perf_counter() - started,
            "warnings": result.warnings,
        }
        if getattr(result, "chosen", None) is not None:  # best of N: the automatic choice (settings.json has it too)
            marker["chosen"] = result.chosen
        # Last, and in one step: a folder with a marker is whole (a failed marker write leaves it to be redone).
        write_text(json.dumps(marker, indent=2) + "\n", folder / COMPLETE_MARKER)
    except Exception as e:  # one bad prompt (or an OOM, or a full disk) must not stop a long batch
        if type(e).__name__ == "OutOfMemoryError":
            import torch

            torch.cuda.empty_cache()
        logger.error("prompt %d (%r) failed: %s: %s", spec.index, spec.prompt, type(e).__name__, e)
        return f"{type(e).__name__}: {e}"
    return None


def write_summary(specs: Sequence[PromptSpec], output_dir: str | Path, summary: BatchSummary) -> Path:
    """Write ``summary.json``: every prompt's folder and status, from the markers and claims on disk.

    Statuses: ``complete``, ``failed`` (in this run), ``in_progress`` (another process holds its claim),
    ``missing``. Written atomically: several processes may write it, and the last one to finish has the last word.
    """
    output_dir = Path(output_dir)
    rows = []
    for spec in specs:
        if is_complete(output_dir / spec.folder):
            status = "complete"
        elif spec.index in summary.failed:
            status = "failed"
        else:
            status = "in_progress" if is_claimed(output_dir, spec) else "missing"
        rows.append({**asdict(spec), "status": status, "error": summary.failed.get(spec.index)})
    record = {
        "total": len(specs),
        "complete": sum(row["status"] == "complete" for row in rows),
        "failed": sum(row["status"] == "failed" for row in rows),
        "in_progress": sum(row["status"] == "in_progress" for row in rows),
        "generated_this_run": len(summary.done),
        "skipped_this_run": len(summary.skipped),
        "seconds": summary.seconds,
        "prompts": rows,
    }
    path = output_dir / SUMMARY_NAME
    write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", path)
    return path
