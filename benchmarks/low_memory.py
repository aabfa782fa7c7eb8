"""Low-memory vs resident chain: peak host RSS and time, each variant in its own process.

Peak RSS is a per-process high-water mark (``ru_maxrss``), so the two variants cannot share a process: this
module runs itself once per variant (``--child``) and collects the JSON each child prints.

    python -m benchmarks.low_memory --out benchmarks/results/low-memory-cpu.json          # real sizes, CPU fp32
    python -m benchmarks.low_memory --mode tiny                                           # seconds, for tests

Weights (``--layout``): ``files`` (default) loads Wonder3D (+ the PeRFlow ΔW) and TripoSR through their real
``from_pretrained`` from fake repositories laid out as the published ones are (`benchmarks.published_layouts`:
the UNet a 1.82 GB fp16 ``.bin``, TripoSR a 1.68 GB fp32 ``model.ckpt``; random weights at the real shapes, written
once under ``--repo-dir``), so the loading peak is measured too; the JSON's ``files`` names each file's format and
dtype. The text-to-image stage is always a random build at the real architecture (no file read). ``random`` builds
every stage in memory (`benchmarks.builders.Builder`), as the benchmark did before.

    python -m benchmarks.low_memory --mode real --variants low_memory --out benchmarks/results/low-memory-files.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("resident", "low_memory")


def _file_loaders(builder: Any, repo_dir: Path) -> dict[str, Any]:
    """Loaders reading the published layouts under `repo_dir` through the stages' own `from_pretrained`."""
    import torch

    from triposr import TSR
    from wonder3d_perflow import MultiviewPipeline

    def multiview():
        pipe = MultiviewPipeline.from_pretrained(
            repo_dir / "wonder3d", delta=repo_dir / "delta", torch_dtype=torch.float32, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return {
        "text_to_image": builder._build_t2i,
        "multiview": multiview,
        "mesh": lambda: TSR.from_pretrained(repo_dir / "triposr", local_files_only=True),
    }


def _child(mode: str, variant: str, layout: str = "random", repo_dir: Path | None = None) -> dict[str, Any]:
    import torch

    from t2mv.chain import TextTo3D
    from t2mv.settings import GenerationSettings
    from t2mv.tiny import FakeRembgSession
    from wonder3d_perflow import MultiviewPipeline

    from .stages import PROMPT, Builder, Sizes, recalibrate_per_call

    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    device = torch.device("cpu")
    builder = Builder(mode, device, torch.float32)
    sizes = Sizes.preset(mode)

    loaders = {"text_to_image": builder._build_t2i, "multiview": builder._build_multiview, "mesh": builder._build_tsr}
    if layout == "files":
        loaders = _file_loaders(builder, repo_dir)

    load_tsr = loaders["mesh"]

    def build_tsr():
        tsr = load_tsr()
        if mode == "real":  # random weights: re-calibrate the density on the chain's own scene code (as chain_cases)
            recalibrate_per_call(tsr)
        return tsr

    loaders = {**loaders, "mesh": build_tsr}
    started = time.perf_counter()
    if variant == "resident":
        chain = TextTo3D(
            loaders["text_to_image"](), loaders["multiview"](), loaders["mesh"](), device=device, dtype=torch.float32,
            rembg_session=FakeRembgSession(),
        )  # fmt: skip
        mv_size = None
    else:
        from t2mv.chain import _low_memory_loaders

        mv_size = 256 if mode == "real" else MultiviewPipeline.tiny().unet.config.sample_size * 8
        chain = TextTo3D(
            loaders=_low_memory_loaders(loaders), multiview_size=mv_size, device=device, dtype=torch.float32,
            rembg_session=FakeRembgSession(),
        )  # fmt: skip
    build_s = time.perf_counter() - started
    settings = GenerationSettings.defaults(mode == "tiny").with_changes(
        height=sizes.t2i_size, width=sizes.t2i_size, mc_resolution=sizes.chain_mc_resolution
    )
    started = time.perf_counter()
    result = chain(PROMPT, settings=settings)
    run_s = time.perf_counter() - started
    return {
        "variant": variant,
        "build_s": build_s,
        "run_s": run_s,
        "stage_timings_s": dict(result.timings),
        "memory_gib": dict(result.memory),
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_imports_gib": rss_after_import,
        "mesh_faces": 0 if result.mesh is None else len(result.mesh.faces),
        "image_sha_prefix": __import__("hashlib").sha256(result.image.tobytes()).hexdigest()[:16],
    }


def run(
    mode: str, variants: tuple[str, ...] = VARIANTS, layout: str = "files", repo_dir: Path | None = None
) -> dict[str, Any]:
    files: dict[str, Any] = {"text_to_image": "random initialisation at the real architecture (no file read)"}
    if layout == "files":
        repo_dir = Path(repo_dir or Path(tempfile.gettempdir()) / f"t2mv-published-layouts-{mode}")
        started = time.perf_counter()
        # Written in its own process, so that the writer's memory never counts towards a variant's peak.
        subprocess.run([sys.executable, "-m", "benchmarks.published_layouts", str(repo_dir), "--mode", mode],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
        files = {**files, **json.loads((repo_dir / "layout.json").read_text())["files"]}
        files["written_or_reused_s"] = time.perf_counter() - started
    else:
        files = {"all": "random initialisation at the real architectures (no file read)"}
    records = []
    for variant in variants:
        load_before = os.getloadavg()
        command = [
            sys.executable,
            "-m",
            "benchmarks.low_memory",
            "--child",
            variant,
            "--mode",
            mode,
            "--layout",
            layout,
        ]
        proc = subprocess.run(
            [*command, *(["--repo-dir", str(repo_dir)] if repo_dir else [])],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if proc.returncode != 0:
            records.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        record["load_average_before"] = list(load_before)
        record["load_average_after"] = list(os.getloadavg())
        records.append(record)
    report: dict[str, Any] = {
        "benchmark": "low_memory",
        "mode": mode,
        "device": "cpu",
        "dtype": "fp32",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "layout": layout,
        "files": files,
        "note": "each variant in its own process; peak RSS = ru_maxrss (file pages of memory maps included); 'build' "
        "of the low-memory variant is the construction only (its stages are loaded inside run_s)",
        "records": records,
    }
    ok = {r["variant"]: r for r in records if "error" not in r}
    if len(ok) == 2:
        res, low = ok["resident"], ok["low_memory"]
        report["summary"] = {
            "peak_rss_gib": {"resident": res["peak_host_rss_gib"], "low_memory": low["peak_host_rss_gib"]},
            "same_image": res["image_sha_prefix"] == low["image_sha_prefix"],
            "time_s_build_plus_run": {
                "resident": res["build_s"] + res["run_s"],
                "low_memory": low["build_s"] + low["run_s"],
            },
            "time_s_run_only": {"resident": res["run_s"], "low_memory": low["run_s"]},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("tiny", "real"), default="real")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: resident,low_memory")
    parser.add_argument("--layout", choices=("files", "random"), default="files",
                        help="files: load Wonder3D and TripoSR from fake repositories laid out as the published ones "
                        "(formats and dtypes as published); random: build every stage in memory")  # fmt: skip
    parser.add_argument("--repo-dir", type=Path, default=None,
                        help="where the fake repositories are written once and reused (default: a temp folder)")  # fmt: skip
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.mode, args.child, args.layout, args.repo_dir)))
        return 0
    report = run(args.mode, tuple(v for v in args.variants.split(",") if v), args.layout, args.repo_dir)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
