"""Command line: ``python -m benchmarks.run --stages t2i,multiview,triposr,mesh,texture,export,chain --tiny|--real
--device cpu|cuda --dtype fp32|fp16|bf16 --runs N --warmup K --out benchmarks/results/<name>.json``.

Each case is warmed up ``K`` times, then timed ``N`` times (CUDA events + synchronize on GPU, perf_counter on CPU);
the JSON holds the median and spread, peak GPU memory and peak host RSS, FLOPs (meta-device replay of the logged
module calls) and the call pattern. ``--variants`` adds attention-backend / dtype / channels-last / compile runs,
each compared with the float32 default-SDPA reference output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from . import SCHEMA
from .harness import (
    CallRecorder,
    PeakMemory,
    environment,
    human_bytes,
    human_flops,
    human_seconds,
    max_diffs,
    summarize,
    time_runs,
)
from .stages import CASE_BUILDERS, STAGES, USES, Builder, Case, Sizes
from .variants import DTYPES, VARIANTS, Variant, applied, parse_variants, unavailable_reason

NO_GPU_NOTE = (
    "No GPU was available to this run: every figure here was measured on the CPU named in 'environment'. "
    "GPU timings and GPU memory are not reported (null); none are estimated."
)


def _csv(text: str, cast=str) -> tuple:
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="tiny models (default; CI)")
    size.add_argument("--real", dest="mode", action="store_const", const="real", help="real sizes, random weights")
    p.set_defaults(mode="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the diffusion stages")
    p.add_argument("--runs", type=int, default=3, help="timed runs per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per case")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--variants", default="", help=f"comma list from {','.join(VARIANTS)} (first case per stage)")
    p.add_argument(
        "--variant-stages", default="t2i,multiview,triposr", help="stages whose first case gets the variants"
    )
    p.add_argument("--t2i-steps", default=None, help="comma list, e.g. 4,8")
    p.add_argument("--mv-steps", default=None, help="comma list, e.g. 4,8")
    p.add_argument("--mc-res", default=None, help="marching-cubes resolutions, e.g. 128,256,512")
    p.add_argument("--texture-sizes", default=None, help="e.g. 1024,2048")
    p.add_argument("--chain-mc-res", type=int, default=None, help="marching-cubes resolution in the chain")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    p.add_argument(
        "--append", action="store_true", help="merge into an existing --out file (same case name: replaced)"
    )
    p.add_argument("--note", action="append", default=[], help="free text recorded in the JSON (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no table")
    return p


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.preset(args.mode)
    if args.t2i_steps:
        sizes.t2i_steps = _csv(args.t2i_steps, int)
    if args.mv_steps:
        sizes.mv_steps = _csv(args.mv_steps, int)
    if args.mc_res:
        sizes.mc_resolutions = _csv(args.mc_res, int)
    if args.texture_sizes:
        sizes.texture_sizes = _csv(args.texture_sizes, int)
    if args.chain_mc_res:
        sizes.chain_mc_resolution = args.chain_mc_res
    return sizes


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, how busy the CPU was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _first_call_recorded(case: Case, recorder: CallRecorder):
    state = {"first": True}

    def fn():
        if state["first"]:
            state["first"] = False
            with recorder:
                return case.fn()
        return case.fn()

    return fn


def measure_case(case: Case, *, runs: int, warmup: int, device: torch.device) -> tuple[dict[str, Any], Any]:
    """Warm-up + timed runs of one case; returns its JSON record and the last result."""
    record: dict[str, Any] = {"stage": case.stage, "name": case.name, "params": case.params, "runs": runs}
    record["warmup"] = warmup
    recorder = CallRecorder(case.modules)
    record["load_average_before"] = _loadavg()
    with PeakMemory(device) as mem:
        times, warm, result = time_runs(_first_call_recorded(case, recorder), runs=runs, warmup=warmup, device=device)
    record["load_average_after"] = _loadavg()
    record["time_s"] = summarize(times)
    record["warmup_s"] = warm
    record["peak_gpu_bytes"] = mem.gpu_peak_bytes
    record["peak_host_rss_bytes"] = mem.host_peak_bytes
    record["host_rss_method"] = mem.host_method
    record["calls"] = recorder.pattern()
    flops = recorder.flops() if case.modules else {"total": 0, "by_module": {}, "method": "no tensor compute"}
    record["flops"] = flops
    median = record["time_s"]["median"]
    record["achieved_gflop_per_s"] = flops["total"] / median / 1e9 if median > 0 else None
    record["result"] = case.describe(result) if case.describe else None
    record["error"] = None
    return record, result


def run_variants(case: Case, variants: list[Variant], *, runs: int, warmup: int, device: torch.device) -> list[dict]:
    """The reference (float32, default SDPA) and each variant on ``case``; output differences vs the reference."""
    if case.output is None or case.variant_target is None:
        return []
    reference = Variant("reference fp32 sdpa")
    with applied(reference, case.variant_target, device):
        ref_times, _, ref_result = time_runs(case.fn, runs=runs, warmup=warmup, device=device)
    ref_out = case.output(ref_result).detach().float().cpu()
    records = [
        {
            "stage": case.stage,
            "case": case.name,
            "variant": reference.name,
            "settings": reference.describe(),
            "time_s": summarize(ref_times),
            "max_abs_diff": 0.0,
            "max_rel_diff": 0.0,
            "rms_rel_diff": 0.0,
            "tolerance_max_abs": reference.tolerance,
            "within_tolerance": True,
            "error": None,
        }
    ]
    for variant in variants:
        rec: dict[str, Any] = {
            "stage": case.stage,
            "case": case.name,
            "variant": variant.name,
            "settings": variant.describe(),
            "tolerance_max_abs": variant.tolerance,
        }
        reason = unavailable_reason(variant, device)
        if reason:
            rec.update(skipped=reason, error=None)
            records.append(rec)
            continue
        try:
            with applied(variant, case.variant_target, device):
                times, warm, result = time_runs(
                    case.fn, runs=runs, warmup=max(warmup, 1 if variant.compile else 0), device=device
                )
            diffs = max_diffs(case.output(result).float(), ref_out)
            rec.update(time_s=summarize(times), **diffs, error=None)
            rec["warmup_s"] = warm  # compile variants: the first is the compile time
            rec["within_tolerance"] = bool(diffs["max_abs_diff"] <= variant.tolerance)
            rec["speedup_vs_reference"] = rec["time_s"]["median"] and (
                records[0]["time_s"]["median"] / rec["time_s"]["median"]
            )
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            rec.update(error=f"{type(e).__name__}: {e}"[:2000])
        records.append(rec)
    return records


def run(args: argparse.Namespace, save=None) -> dict[str, Any]:
    """Measure every case of ``args.stages``; ``save(report)`` is called after each case (partial results survive
    an interrupted real-size run)."""
    stages = _csv(args.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False on this machine.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    variants = parse_variants(list(_csv(args.variants)))
    sizes = _sizes(args)
    builder = Builder(args.mode, device, dtype)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "mode": args.mode,
        "weights": "random (real architecture sizes)" if args.mode == "real" else "random (tiny test models)",
        "device": str(device),
        "dtype": args.dtype,
        "runs": args.runs,
        "warmup": args.warmup,
        "gpu_measured": device.type == "cuda",
        "notes": ([] if device.type == "cuda" else [NO_GPU_NOTE]) + list(args.note),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.__dict__.items()},
        "environment": environment(device, dtype),
        "cases": [],
        "variants": [],
    }
    try:
        for i, stage in enumerate(stages):
            try:
                cases = CASE_BUILDERS[stage](builder, sizes)
            except Exception as e:
                report["cases"].append(_error_record(stage, f"{stage} (building)", e))
                continue
            for j, case in enumerate(cases):
                try:
                    record, _ = measure_case(case, runs=args.runs, warmup=args.warmup, device=device)
                except Exception as e:
                    record = _error_record(stage, case.name, e, params=case.params)
                report["cases"].append(record)
                if save is not None:
                    save(report)
                if not args.quiet:
                    print(_row(record), flush=True)
                if j == 0 and variants and stage in _csv(args.variant_stages):
                    try:
                        report["variants"] += run_variants(
                            case, variants, runs=args.runs, warmup=args.warmup, device=device
                        )
                    except Exception as e:
                        report["variants"].append(
                            {"stage": stage, "case": case.name, "variant": "reference", "error": repr(e)[:2000]}
                        )
            # Free what no later stage uses (real-size models are GBs each).
            later = {obj for s in stages[i + 1 :] for obj in USES[s]}
            unused = [obj for obj in USES[stage] if obj not in later]
            if "tsr" in unused:
                unused += [k for k in list(builder._cache) if k.startswith(("mesh", "scene_codes"))]
            builder.release(*unused)
    finally:
        builder.close()
    return report


def _error_record(stage: str, name: str, e: Exception, params: dict | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "name": name,
        "params": params or {},
        "error": f"{type(e).__name__}: {e}"[:2000],
        "traceback": traceback.format_exc()[-4000:],
    }


def _row(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['stage']:<10} {r['name']:<52} ERROR {r['error'][:120]}"
    t = r["time_s"]
    spread = f"{human_seconds(t['min'])}–{human_seconds(t['max'])}"
    return (
        f"{r['stage']:<10} {r['name']:<52} {human_seconds(t['median']):>9} {spread:>19} "
        f"{human_seconds(t['iqr']):>9} {human_bytes(r['peak_host_rss_bytes']):>10} "
        f"{human_bytes(r['peak_gpu_bytes']):>10} {human_flops(r['flops']['total']):>12}"
    )


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'stage':<10} {'case':<52} {'median':>9} {'min–max':>19} {'IQR':>9} {'host peak':>10} "
        f"{'GPU peak':>10} {'FLOPs':>12}"
    )
    lines = [head, "-" * len(head)] + [_row(r) for r in report["cases"]]
    if report.get("variants"):
        lines += ["", f"{'variant':<44} {'median':>9} {'max abs diff':>13} {'max rel diff':>13}  ok"]
        for v in report["variants"]:
            label = f"{v['stage']}: {v['variant']}"
            if v.get("skipped") or v.get("error"):
                lines.append(
                    f"{label:<44} {'skipped' if v.get('skipped') else 'ERROR'}: {v.get('skipped') or v['error']}"[:200]
                )
            else:
                lines.append(
                    f"{label:<44} {human_seconds(v['time_s']['median']):>9} {v['max_abs_diff']:>13.3e} "
                    f"{v['max_rel_diff']:>13.3e}  {'yes' if v['within_tolerance'] else 'NO'}"
                )
    return "\n".join(lines)


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``--append``: keep old cases unless re-measured; notes and commands accumulate."""
    names = {c["name"] for c in new["cases"]}
    merged = dict(new)
    merged["cases"] = [c for c in old.get("cases", []) if c["name"] not in names] + new["cases"]
    keys = {(v["case"], v["variant"]) for v in new["variants"]}
    merged["variants"] = [v for v in old.get("variants", []) if (v.get("case"), v.get("variant")) not in keys]
    merged["variants"] += new["variants"]
    merged["notes"] = list(dict.fromkeys(old.get("notes", []) + new["notes"]))
    merged["commands"] = old.get("commands", [old.get("command")]) + [new["command"]]
    merged["created_utc"] = old.get("created_utc", new["created_utc"])
    merged["updated_utc"] = new["created_utc"]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise SystemExit("--runs must be >= 1 and --warmup >= 0")
    previous = None
    if args.out and args.append and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())

    def save(report: dict[str, Any]) -> dict[str, Any]:
        if not args.out:
            return report
        if previous is not None:
            report = _merge(previous, report)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, out)
        return report

    report = save(run(args, save=save))
    if not args.quiet:
        print()
        print(table(report))
        if args.out:
            print(f"\nwrote {args.out}")
    return 1 if any(c.get("error") for c in report["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
