"""The runner: runs a plan of stages (`t2mv.chain.stages`) and does, for every stage alike, what is not the stage's
own work: the progress callback, timings, memory, writing the stage's files as it ends, the ``FAILED.json`` marker
when a later stage fails, and loading / moving / freeing each stage's model (`t2mv.residency.StageSlot`).

The runner never knows which stage it runs: it reads a stage's ``name``, ``model``, ``timed``, ``needs`` and
``adds`` and calls its ``run``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import StageFailedError
from ..inputs import write_text
from ..residency import StageSlot
from .files import FAILED_MARKER, to_json
from .stages import Stage, StageContext, check_plan

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage name, index, total), before each timed stage
StageDone = Callable[[str, Any], None]  # (stage name, partial result), after each stage


def host_rss_gib() -> float:
    """This process's resident set size now (GiB)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # psutil comes with accelerate; /proc is the Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def host_peak_rss_gib() -> float:
    """This process's peak resident set size so far (GiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def model_groups(plan: Sequence[Stage]) -> list[list[Stage]]:
    """The plan cut into runs of consecutive stages sharing one model slot (a stage without a model: alone), so a
    model is loaded or moved once for all of them (TripoSR stays on the device from the mesh to the texture)."""
    groups: list[list[Stage]] = []
    for stage in plan:
        if groups and stage.model is not None and groups[-1][-1].model == stage.model:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


class Runner:
    """Runs one request's plan.

    Args:
        slots: {model slot name: `StageSlot`} (resident, offloaded or loaded per run).
        device: where the models run.
        offload: move each resident model to `device` only while its stages run.
        callback: ``callback(stage_name, index, total)`` before each timed stage (progress bars).
        on_stage_done: ``on_stage_done(stage_name, partial_result)`` after each stage (its files are written).
        folder: write each stage's files here as it ends (`ChainResult.save_stage`), the record at the end, and
            ``FAILED.json`` when a stage fails after others finished; None writes nothing.
        mesh_formats: the mesh files written (checked by the caller).
    """

    def __init__(
        self,
        slots: dict[str, StageSlot],
        device: torch.device,
        *,
        offload: bool = False,
        callback: Progress | None = None,
        on_stage_done: StageDone | None = None,
        folder: Path | None = None,
        mesh_formats: Sequence[str] = ("glb",),
    ):
        self.slots, self.device, self.offload = slots, device, offload
        self.callback, self.on_stage_done = callback, on_stage_done
        self.folder, self.mesh_formats = folder, tuple(mesh_formats)
        self.current = "input"  # the stage running now (named by FAILED.json)
        self._timed: list[str] = []

    def run(self, plan: Sequence[Stage], ctx: StageContext) -> Any:
        """Run `plan` on ``ctx.result`` and return it.

        Raises:
            ValueError: the plan is inconsistent (a stage needs what no earlier stage adds), before anything runs.
            StageFailedError: a stage failed after earlier ones were written to `folder` (``cause``: the error);
                without a folder, or when nothing finished yet, the original error.
        """
        check_plan(plan)
        result = ctx.result
        self._timed = result.plan = [stage.name for stage in plan if stage.timed]
        started = time.perf_counter()
        try:
            for group in model_groups(plan):
                self._run_group(group, ctx)
        except BaseException as error:
            if self.folder is None or not result.finished:
                raise
            self._mark_failed(error, result)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: files kept, marker written
                raise
            raise StageFailedError(self.current, self.folder, error) from error
        result.timings["total"] = time.perf_counter() - started
        result.memory["host_peak_rss"] = host_peak_rss_gib()
        if self.folder is not None:
            result.save_stage("record", self.folder)
            (self.folder / FAILED_MARKER).unlink(missing_ok=True)  # an earlier failed run's: the folder is whole now
        return result

    def _run_group(self, group: list[Stage], ctx: StageContext) -> None:
        """The group's stages with their model on the device (loaded first in low-memory mode, freed after)."""
        slot_name = group[0].model
        if slot_name is None:
            for stage in group:
                self._run_stage(stage, ctx, None, self._enter(stage))
            return
        start = self._enter(group[0])  # loading or moving the model counts to the group's first stage

        def run_all(model: Any) -> None:
            self._run_stage(group[0], ctx, model, start)
            for stage in group[1:]:
                self._run_stage(stage, ctx, model, self._enter(stage))

        self.slots[slot_name].run(self.device, run_all, offload=self.offload)

    def _enter(self, stage: Stage) -> float:
        self.current = stage.name
        if stage.timed:
            if self.callback is not None:
                self.callback(stage.name, self._timed.index(stage.name), len(self._timed))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _run_stage(self, stage: Stage, ctx: StageContext, model: Any, start: float) -> None:
        stage.run(ctx, model)
        result = ctx.result
        if stage.timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                result.memory[f"{stage.name}.gpu_peak"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            result.timings[stage.name] = time.perf_counter() - start
            result.memory[f"{stage.name}.host_rss"] = host_rss_gib()
        if self.folder is not None:
            result.save_stage(stage.name, self.folder, mesh_formats=self.mesh_formats)
        result.finished.append(stage.name)  # on disk now (when there is a folder)
        if self.on_stage_done is not None:
            self.on_stage_done(stage.name, result)

    def _mark_failed(self, error: BaseException, result: Any) -> None:
        """Write FAILED.json (which stage failed, why, what finished) and the record next to the kept files."""
        assert self.folder is not None
        marker = {
            "failed_stage": self.current,
            "error_type": type(error).__name__,
            "error": " ".join(str(error).split()),
            "finished_stages": list(result.finished),
            "timings": result.timings,
        }
        try:
            write_text(to_json(marker), self.folder / FAILED_MARKER)
            result.save_stage("record", self.folder)
        except OSError as e:  # the disk itself failed: the original error matters more than the marker
            logger.warning("could not write %s: %s", self.folder / FAILED_MARKER, e)
