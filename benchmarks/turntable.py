"""Benchmark: the turntable video (`t2mv.turntable.make_turntable`) of a ~100k-face vertex-coloured mesh.

    python -m benchmarks.turntable [--faces 100000] [--size 512] [--frames 36] [--runs 2] [--threads 2] [--out JSON]

The mesh is benchmarks.view_texture's object-like marching-cubes blob, simplified to the face count (a simplified
TripoSR mesh's size). Records wall time per run (render and encode split), process CPU time and the load average,
so a figure measured on a busy machine says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.view_texture import object_mesh
from t2mv.turntable import TurntableConfig, make_turntable

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "turntable-cpu-2core.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mesh = object_mesh(args.faces, grid=256)
    colours = (np.asarray(mesh.vertices) - mesh.bounds[0]) / np.ptp(mesh.bounds, axis=0)  # (V, 3) a smooth gradient
    mesh.visual.vertex_colors = np.concatenate([colours * 255, np.full((len(colours), 1), 255)], axis=1).astype(
        np.uint8
    )
    cfg = TurntableConfig(frames=args.frames, size=args.size)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            wall, cpu = time.perf_counter(), time.process_time()
            result = make_turntable(mesh, Path(tmp) / "turntable.mp4", cfg)
            runs.append(
                {
                    "wall_s": round(time.perf_counter() - wall, 3),
                    "process_cpu_s": round(time.process_time() - cpu, 3),
                    "timings": {k: round(v, 3) for k, v in result.timings.items()},
                    "load_average": os.getloadavg(),
                }
            )
    record = {
        "benchmark": "turntable",
        "command": "python -m benchmarks.turntable " + " ".join(sys.argv[1:] if argv is None else argv),
        "faces": len(mesh.faces),
        "frames": args.frames,
        "size": args.size,
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "runs": runs,
        "best_wall_s": min(r["wall_s"] for r in runs),
        "target_s": 10.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("faces", "best_wall_s", "target_s")}), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
