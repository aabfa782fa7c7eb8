"""Views that go wrong: what `t2mv.views_to_mesh.views_to_mesh` makes of the failures a user meets.

    python -m benchmarks.view_failures [--preset small|full] [--objects robot,gear] [--cases ...] [--refine]
        [--out benchmarks/results/view_failures-cpu-2core.json] [--threads N] [--device cpu|cuda]
    python -m benchmarks.view_failures --merge a.json b.json --out benchmarks/results/view_failures-cpu-2core.json

`benchmarks.view_quality` measures the stage on views a generator drew well, with the imperfections every drawing
has. This one breaks the views the ways they break, one case at a time, on a benchmark object (its imperfect views
otherwise), runs the stage as the chain does (under `torch.no_grad()`, TripoSR's colour field as the fallback) and
records what a user would see: the texture's gain over the field colours (texture PSNR on the novel views, after
the fitted alignment, as `view_quality` scores it), with `--refine` the Chamfer change against the start and
whether the fit was accepted, which views the stage left out, the parts it added, its warnings and its time.

Cases (`CASES`):
- baseline: the imperfect views as they are (the reference for the others);
- grey-backdrop: the back view's colour view and normal map on a uniform grey (228) instead of white;
- ramp-backdrop: the back colour view on a left-to-right grey ramp (200-250: a photo's backdrop kept);
- ramp-backdrop-both: the same, its normal map too;
- zoomed: every view zoomed 1.3x about its centre (the picture cuts the object off);
- noise: every view uniform noise (what a smoke run's tiny random models give);
- other-object: the views of the next benchmark object (Wonder3D and TripoSR disagreeing about the shape).

What a case should give: the backdrops within a fraction of a dB of the baseline (a view that cannot be used left
out with a note); noise and another object's views no texture or a flagged one, no parts, and any refinement
rejected, in about the baseline's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .view_quality import SAMPLES, TEXTURE_SIZE, run_variant, score, to_truth_frame, truth_renders
from .view_scenes import OBJECTS, Case, make_case

DEFAULT_OUT = Path(__file__).parent / "results" / "view_failures-cpu-2core.json"
BACK = 3  # the back view: the one a generator draws worst
GREY = 228
RAMP = (200.0, 250.0)
ZOOM = 1.3

Views = tuple[list[Image.Image], list[Image.Image]]


def _replace_white(image: Image.Image, fill: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """The view with its white background (every channel >= 250) replaced by `fill(shape)` (H, W, 3)."""
    a = np.asarray(image.convert("RGB")).astype(np.float64)
    white = (a >= 250).all(-1)
    return Image.fromarray(np.where(white[..., None], fill(a.shape), a).round().clip(0, 255).astype(np.uint8))


def _grey(shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, float(GREY))


def _ramp(shape: tuple[int, ...]) -> np.ndarray:
    return np.linspace(*RAMP, shape[1])[None, :, None] * np.ones(shape)


def _zoom(image: Image.Image) -> Image.Image:
    size = image.size[0]
    half = size / (2 * ZOOM)
    box = tuple(round(size / 2 + d) for d in (-half, -half, half, half))
    return image.crop(box).resize((size, size), Image.BICUBIC)


def _views(case: Case, name: str, seed: int) -> Views:
    """The case's colour views and normal maps, broken as `name` says."""
    colors, normals = list(case.colors), list(case.normals)
    if name == "grey-backdrop":
        colors[BACK], normals[BACK] = _replace_white(colors[BACK], _grey), _replace_white(normals[BACK], _grey)
    elif name in ("ramp-backdrop", "ramp-backdrop-both"):
        colors[BACK] = _replace_white(colors[BACK], _ramp)
        if name.endswith("both"):
            normals[BACK] = _replace_white(normals[BACK], _ramp)
    elif name == "zoomed":
        colors, normals = [_zoom(c) for c in colors], [_zoom(n) for n in normals]
    elif name == "noise":
        rng = np.random.default_rng(seed)
        size = colors[0].size[0]
        colors, normals = ([Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(6)]
                           for _ in range(2))  # fmt: skip
    elif name != "baseline":
        raise ValueError(f"unknown case {name!r}")
    return colors, normals


CASES = ("baseline", "grey-backdrop", "ramp-backdrop", "ramp-backdrop-both", "zoomed", "noise", "other-object")


def run_case(
    case: Case, views: Views, truth: list, field: dict, *, preset: str, refine: bool, device: torch.device
) -> dict[str, Any]:
    """One run of the stage on broken views (`view_quality.run_variant`, as the chain calls it), scored against the
    case's truth: the texture's gain over the field colours first, then what the run recorded."""
    variant = "views+refine" if refine else "views"
    mesh, info = run_variant(case, variant, texture_size=TEXTURE_SIZE[preset], device=device, iterations=None,
                             views=views)  # fmt: skip
    metrics = score(case, to_truth_frame(case, mesh), truth, SAMPLES[preset]).metrics
    record: dict[str, Any] = {"texture_gain_db": round(metrics["texture_psnr"] - field["texture_psnr"], 3)}
    if refine:
        record["chamfer_change"] = round(metrics["chamfer"] / field["chamfer"] - 1.0, 4)
        record["normal_consistency"] = round(metrics["normal_consistency"], 4)
        record["refine_accepted"] = None  # unless `info` has it: None when the refinement did not run
    return record | info


def evaluate_object(name: str, cases: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    t = time.perf_counter()
    case = make_case(name, preset=args.preset, seed=args.seed)
    truth = truth_renders(case)
    field = score(case, to_truth_frame(case, case.start), truth, SAMPLES[args.preset]).metrics
    record: dict[str, Any] = {
        "case": dict(case.info),
        "case_seconds": round(time.perf_counter() - t, 3),
        "field": {k: round(float(field[k]), 5) for k in ("texture_psnr", "chamfer", "normal_consistency")},
        "cases": {},
    }
    for which in cases:
        if which == "other-object":
            other = OBJECTS[(OBJECTS.index(name) + 1) % len(OBJECTS)]
            donor = make_case(other, preset=args.preset, seed=args.seed)
            views: Views = (list(donor.colors), list(donor.normals))
        else:
            other, views = None, _views(case, which, args.seed)
        result = run_case(case, views, truth, field, preset=args.preset, refine=args.refine, device=device)
        if other is not None:
            result["views_of"] = other
        record["cases"][which] = result
        shape = f" chamfer {result['chamfer_change']:+.1%} accepted {result['refine_accepted']}" if args.refine else ""
        print(
            f"  {name:6s} {which:19s} texture {result['texture_gain_db']:+.2f} dB (textured {result['textured']})"
            f"{shape}  {result['seconds']:.1f} s",
            flush=True,
        )
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.view_failures", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("small", "full"), default="full")
    p.add_argument("--objects", default="robot,gear", help=f"comma list from {','.join(OBJECTS)}")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list from {','.join(CASES)}")
    p.add_argument("--refine", action="store_true", help="refine too (views_to_mesh(refine=True))")
    p.add_argument("--seed", type=int, default=0, help="the views' imperfections (and the noise)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help=f"JSON path (default for --preset full: {DEFAULT_OUT})")
    p.add_argument("--note", action="append", default=[], help="free text recorded in the JSON")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="only merge records into --out")
    return p


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Records of separate runs (other objects, e.g. in parallel processes) as one: objects united, later runs
    winning; each run's command, date, notes and load kept under "runs"."""
    merged = {k: v for k, v in records[0].items() if k not in ("objects", "command", "date", "notes")}
    merged["runs"] = [
        {k: r.get(k) for k in ("command", "date", "notes", "load_average", "load_average_end", "refine")}
        | {"objects": list(r["objects"])}
        for r in records
    ]
    merged["objects"] = {}
    for r in records:
        merged["objects"].update(r["objects"])
    return merged


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .harness import comma_list, merge_files

    if args.merge:
        return 0 if merge_files(args.merge, args.out, merge_records) is not None else 2

    objects, cases = comma_list(args.objects), comma_list(args.cases)
    bad = [o for o in objects if o not in OBJECTS] + [c for c in cases if c not in CASES]
    if bad or not objects or not cases:
        print(f"error: unknown or no objects/cases {bad}; objects: {OBJECTS}, cases: {CASES}", file=sys.stderr)
        return 2
    from .harness import record_header, run_setup

    device, out = run_setup(args, DEFAULT_OUT)

    record: dict[str, Any] = {
        **record_header("view_failures", argv, device),
        "preset": args.preset,
        "refine": args.refine,
        "notes": args.note,
        "objects": {},
    }
    for name in objects:
        record["objects"][name] = evaluate_object(name, cases, args, device)
        record["load_average_end"] = list(os.getloadavg())
        if out is not None:  # partial results after every object
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
