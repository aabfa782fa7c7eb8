"""Markdown tables from a benchmark JSON: ``python -m benchmarks.report benchmarks/results/<name>.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .harness import human_bytes, human_flops, human_seconds


def _spread(t: dict[str, Any]) -> str:
    if t["n"] == 1:
        return "1 run"
    return f"{human_seconds(t['min'])}–{human_seconds(t['max'])} (IQR {human_seconds(t['iqr'])}, n={t['n']})"


def _calls(calls: dict[str, Any]) -> str:
    parts = []
    for name, c in calls.items():
        batches = "/".join(str(b) for b in c["batch_sizes"])
        parts.append(f"{name} {c['calls']}×b{batches}")
    return ", ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Device: {report['device']} ({env.get('gpu_name') or env.get('cpu_model')}), "
        f"{env['torch_num_threads']} torch threads, dtype {report['dtype']}, torch {env['torch']}, "
        f"diffusers {env['diffusers']}; weights: {report['weights']}.",
        "",
        "| stage | case | median | spread | warm-up | peak host RSS | peak GPU | FLOPs | load avg before→after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        if c.get("error"):
            lines.append(f"| {c['stage']} | {c['name']} | error: {c['error'][:80]} | | | | | | |")
            continue
        warm = ", ".join(human_seconds(w) for w in c.get("warmup_s", [])) or "none"
        load = ""
        if c.get("load_average_before") and c.get("load_average_after"):
            load = f"{c['load_average_before'][0]:.1f}→{c['load_average_after'][0]:.1f}"
        lines.append(
            f"| {c['stage']} | {c['name']} | {human_seconds(c['time_s']['median'])} | {_spread(c['time_s'])} | "
            f"{warm} | {human_bytes(c['peak_host_rss_bytes'])} | {human_bytes(c['peak_gpu_bytes'])} | "
            f"{human_flops(c['flops']['total'])} | {load} |"
        )
    if report.get("variants"):
        lines += [
            "",
            "| stage | variant | median | max abs diff | max rel diff | within tolerance |",
            "|---|---|---|---|---|---|",
        ]
        for v in report["variants"]:
            if v.get("skipped") or v.get("error"):
                lines.append(f"| {v['stage']} | {v['variant']} | {v.get('skipped') or 'error'} | | | |")
                continue
            lines.append(
                f"| {v['stage']} | {v['variant']} | {human_seconds(v['time_s']['median'])} | "
                f"{v['max_abs_diff']:.2e} | {v['max_rel_diff']:.2e} | {'yes' if v['within_tolerance'] else 'no'} |"
            )
    calls = [c for c in report["cases"] if not c.get("error") and c.get("calls")]
    if calls:
        lines += ["", "Module calls per run (count × batch):", ""]
        lines += [f"- {c['name']}: {_calls(c['calls'])}" for c in calls]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
