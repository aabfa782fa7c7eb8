"""Diffusion-stage speed levers (issue 10, item 4), each measured against the current eager path in one run, with
the output difference: compiled mode (its compile time apart: the first call), one text-encoder batch for prompt +
negative (against diffusers' two calls), channels-last, and which SDPA kernels run.

``python -m benchmarks.compile_speed --tiny|--real --stages t2i,multiview --device cpu|cuda --dtype fp32|fp16|bf16
--runs N --threads N --levers compile,channels-last,text-encoder,sdpa --out benchmarks/results/<name>.json``

The JSON is written after every lever (a long compile that is interrupted leaves the levers before it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import SCHEMA
from .harness import environment, max_diffs, summarize, time_runs
from .stages import PROMPT, Builder, Sizes, object_image
from .variants import DTYPES

LEVERS = ("text-encoder", "channels-last", "compile", "sdpa")
STAGES = ("t2i", "multiview")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def stage_callables(stage: str, builder: Builder, sizes: Sizes) -> tuple[Any, Callable[[], Any], Callable, dict]:
    """(pipeline object with enable_compile, one call, result → comparable tensor, call parameters) of a stage."""
    if stage == "t2i":
        t2i = builder.t2i()
        params = {"size": sizes.t2i_size, "steps": sizes.t2i_steps[0], "guidance_scale": sizes.t2i_guidance}

        def run():
            return t2i(
                PROMPT,
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                height=params["size"],
                width=params["size"],
                generator=_generator(),
                output_type="pt",
            )

        return t2i, run, lambda r: r.images, params
    pipe = builder.multiview()
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    image = object_image(size, (255, 255, 255))
    params = {"size": size, "steps": sizes.mv_steps[0], "guidance_scale": sizes.mv_guidance, "views": 12}

    def run_mv():
        return pipe(
            image,
            num_inference_steps=params["steps"],
            guidance_scale=params["guidance_scale"],
            generator=_generator(),
            output_type="pt",
        )

    return pipe, run_mv, lambda r: torch.cat([r.normals_tensor, r.colors_tensor]), params


def _modules(owner: Any) -> dict[str, torch.nn.Module]:
    pipe = getattr(owner, "pipe", owner)  # TextToImage wraps a diffusers pipeline
    return {"unet": pipe.unet, "vae": pipe.vae}


def _timed(run: Callable[[], Any], runs: int, device: torch.device) -> tuple[dict[str, Any], Any]:
    times, _, result = time_runs(run, runs=runs, warmup=0, device=device)
    return summarize(times), result


def paired(
    run: Callable[[], Any], eager: Callable[[], None], lever: Callable[[], None], runs: int, device: torch.device
) -> tuple[list[float], list[float], Any]:
    """Time ``run`` alternately on the current path and with the lever, ``runs`` pairs; switching is untimed.

    On a shared machine the load changes from minute to minute: interleaving puts both sides under the same
    load, and the median of the per-pair ratios is the figure to trust. Returns (eager s, lever s, last result).
    """
    eager_times, lever_times, result = [], [], None
    for _ in range(runs):
        eager()
        eager_times += time_runs(run, runs=1, warmup=0, device=device)[0]
        lever()
        times, _, result = time_runs(run, runs=1, warmup=0, device=device)
        lever_times += times
    return eager_times, lever_times, result


def measure_stage(
    stage: str, builder: Builder, sizes: Sizes, levers: tuple[str, ...], args: argparse.Namespace, save
) -> list[dict[str, Any]]:
    device = builder.device
    owner, run, output, params = stage_callables(stage, builder, sizes)
    records: list[dict[str, Any]] = []

    def add(record: dict[str, Any]) -> None:
        record = {"stage": stage, "params": params, **record, "load_average_after": _loadavg()}
        records.append(record)
        save(records)
        if not args.quiet:
            brief = {k: v for k, v in record.items() if k not in ("params", "time_s")}
            median = record.get("time_s", {}).get("median")
            print(f"{stage:<10} {record['lever']:<34} median {median}  {json.dumps(brief)[:300]}", flush=True)

    # The current path: eager, default SDPA, contiguous memory, warmed up once (only when a lever needs whole calls).
    reference = None
    if {"channels-last", "compile"} & set(levers):
        load_before = _loadavg()
        run()
        eager_time, eager_result = _timed(run, args.runs, device)
        reference = output(eager_result).detach().float().cpu()
        add({"lever": "eager (current path)", "time_s": eager_time, "load_average_before": load_before})

    def compared(name: str, eager_times: list[float], times: list[float], result: Any, **extra: Any) -> None:
        diffs = max_diffs(output(result).float(), reference)
        ratios = sorted(e / t for e, t in zip(eager_times, times, strict=True))
        add(
            {
                "lever": name,
                "time_s": summarize(times),
                "paired_eager_time_s": summarize(eager_times),
                "speedup_vs_eager": summarize(ratios)["median"],  # median of per-pair ratios
                "speedup_vs_eager_range": [ratios[0], ratios[-1]],
                **diffs,
                **extra,
            }
        )

    if "text-encoder" in levers and stage == "t2i":
        t2i = owner
        pipe = t2i.pipe
        with torch.no_grad():
            ours = t2i.encode_prompts([PROMPT], [""], True)
            twice = pipe._encode_prompt(PROMPT, device, 1, True, "")  # diffusers: prompt, then negative
        one_batch, two_calls = [], []
        with torch.no_grad():
            for _ in range(max(args.runs, 5) + 1):  # interleaved; the first pair is a warm-up
                one_batch += time_runs(
                    lambda: t2i.encode_prompts([PROMPT], [""], True), runs=1, warmup=0, device=device
                )[0]
                two_calls += time_runs(
                    lambda: pipe._encode_prompt(PROMPT, device, 1, True, ""), runs=1, warmup=0, device=device
                )[0]
        one_batch, two_calls = one_batch[1:], two_calls[1:]
        diffs = max_diffs(torch.cat([ours[1], ours[0]]).float(), twice.float())
        add(
            {
                "lever": "text encoder: one batch (ours) vs two calls",
                "time_s": summarize(one_batch),
                "diffusers_two_calls_time_s": summarize(two_calls),
                "speedup_vs_two_calls": summarize(two_calls)["median"] / summarize(one_batch)["median"],
                **diffs,
            }
        )

    if "sdpa" in levers:
        from t2mv.text_to_image import sdpa_kernels

        with torch.no_grad():
            kernels = sdpa_kernels(run)
        add({"lever": "sdpa kernels (eager call, profiler)", "kernels": kernels, "device": str(device)})

    if "channels-last" in levers:
        modules = _modules(owner)

        def memory_format(fmt):
            def switch():
                for m in modules.values():
                    m.to(memory_format=fmt)

            return switch

        contiguous, channels_last = memory_format(torch.contiguous_format), memory_format(torch.channels_last)
        try:
            channels_last()
            run()  # warm-up in the new layout
            eager_times, times, result = paired(run, contiguous, channels_last, args.runs, device)
            compared("channels-last (unet + vae)", eager_times, times, result)
        finally:
            contiguous()

    if "compile" in levers:
        started = _dt.datetime.now(_dt.timezone.utc)
        on = owner.enable_compile(backend=args.backend, mode=args.mode)
        if not on:
            add({"lever": "compile", "error": "compiled mode unavailable here (see the log)"})
        else:
            try:
                first = run()
                compile_s = first.timings.get("compile")
                # Recorded at once: on a slow machine the paired runs below may not finish.
                add({"lever": f"compile ({args.backend}, mode={args.mode}): first call", "compile_s": compile_s})
                compiled = {name: m._compiled_call_impl for name, m in owner._compiled.modules.items()}

                def set_compiled(on: bool):
                    def switch():  # the compiled callables are kept: switching never recompiles
                        for name, m in owner._compiled.modules.items():
                            m._compiled_call_impl = compiled[name] if on else None

                    return switch

                eager_times, times, result = paired(run, set_compiled(False), set_compiled(True), args.runs, device)
                compared(
                    f"compile ({args.backend}, mode={args.mode})",
                    eager_times,
                    times,
                    result,
                    compile_s=compile_s,
                    compile_started_utc=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    compiled_after_first_call=bool(first.settings.get("compiled")),
                )
            finally:
                owner.disable_compile()
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny")
    size.add_argument("--real", dest="preset", action="store_const", const="real")
    p.set_defaults(preset="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma list from {','.join(LEVERS)}")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    p.add_argument("--out", default=None)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    levers = tuple(s.strip() for s in args.levers.split(",") if s.strip())
    if not stages or any(s not in STAGES for s in stages) or any(lv not in LEVERS for lv in levers):
        raise SystemExit(f"--stages from {STAGES}, --levers from {LEVERS}")
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    builder = Builder(args.preset, device, dtype)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "diffusion speed levers",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m benchmarks.compile_speed", *sys.argv[1:]] if argv is None else argv),
        "mode": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "runs": args.runs,
        "notes": list(args.note),
        "environment": environment(device, dtype),
        "levers": [],
    }
    done: list[dict[str, Any]] = []

    def save(stage_records: list[dict[str, Any]]) -> None:
        report["levers"] = done + stage_records
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
            os.replace(tmp, out)

    sizes = Sizes.preset(args.preset)
    try:
        for stage in stages:
            done += measure_stage(stage, builder, sizes, levers, args, save)
            builder.release("t2i" if stage == "t2i" else "multiview")
    finally:
        builder.close()
    save([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
