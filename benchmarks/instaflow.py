"""Fast text-to-image side by side: InstaFlow (1 step, no guidance) vs PeRFlow (4 steps + CFG 4.5), and the
PeRFlow-Refiner's upscale (ControlNet-Tile img2img, 4 steps, CFG 4.5), in one run → JSON.

Real sizes with random weights (SD1.5 UNet/VAE/CLIP-L, the tile ControlNet's config): the cost does not depend on
the weights. Both text-to-image variants share one UNet, VAE and text encoder; only the sampler differs, so the
difference is the sampling itself. The refiner shares them too (as `Refiner.from_text_to_image` does in the chain).

    python -m benchmarks.instaflow --size 512 --upscale 1024 --out benchmarks/results/instaflow-cpu.json \
        --note "shared 2-core CPU, load ~12"

``--size 256 --upscale 512`` fits a few minutes on a loaded 2-core CPU. Each case runs ``--runs`` times after one
untimed warm-up (``--warmup 0`` skips it); the median is reported with every run's time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import PIL.Image
import torch

from benchmarks import configs
from benchmarks.builders import Builder

# lllyasviel/control_v11f1e_sd15_tile (tests/test_hub.py checks these against the published config).
TILE_CONTROLNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


class UNetCounter:
    """Counts UNet (and ControlNet) forward calls and their batch rows."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = self.rows = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0]) if args else 0

    def reset(self) -> None:
        self.calls = self.rows = 0


def _time(fn, runs: int, warmup: int) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = fn()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, out


def build(seed: int):
    """PeRFlow and InstaFlow `TextToImage` stages over one random SD1.5 pipeline, and a refiner over it."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from t2mv.perflow.rf_scheduler import RectifiedFlowScheduler
    from t2mv.rectified_flow import INSTAFLOW_DEFAULTS
    from t2mv.refiner import Refiner
    from t2mv.text_to_image import TextToImage

    builder = Builder("real", torch.device("cpu"), torch.float32, seed=seed)
    perflow = builder.t2i()
    source = perflow.pipe
    rf_pipe = StableDiffusionPipeline(
        vae=source.vae,
        text_encoder=source.text_encoder,
        tokenizer=source.tokenizer,
        unet=source.unet,
        scheduler=RectifiedFlowScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    rf_pipe.set_progress_bar_config(disable=True)
    instaflow = TextToImage(
        rf_pipe,
        settings={"model": "random weights, InstaFlow (SD1.5 architecture)"},
        default_size=512,
        defaults=INSTAFLOW_DEFAULTS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        controlnet = ControlNetModel(**TILE_CONTROLNET).eval()
    refiner = Refiner.from_text_to_image(perflow, controlnet, settings={"controlnet": "random weights, tile config"})
    return builder, perflow, instaflow, refiner


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="text-to-image side (default 512)")
    parser.add_argument("--upscale", type=int, default=1024, help="refiner target side; 0 skips it (default 1024)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument(
        "--cases", default="instaflow,perflow,refiner", help="comma-separated subset of instaflow,perflow,refiner"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    started = time.perf_counter()
    _, perflow, instaflow, refiner = build(seed=0)
    build_seconds = time.perf_counter() - started
    counter = UNetCounter(perflow.pipe.unet, refiner.pipe.controlnet)
    prompt = "a red sports car, studio lighting"
    cases = []

    def t2i_case(name, stage, **kwargs):
        def run():
            counter.reset()
            return stage(prompt, height=args.size, width=args.size, seed=0, **kwargs)

        seconds, out = _time(run, args.runs, args.warmup)
        cases.append(
            {
                "name": name,
                "size": args.size,
                "num_inference_steps": out.settings["num_inference_steps"],
                "guidance_scale": out.settings["guidance_scale"],
                "unet_calls": counter.calls,
                "unet_rows": counter.rows,
                "seconds": seconds,
                "median_s": statistics.median(seconds),
            }
        )
        print(f"{name}: {statistics.median(seconds):.2f} s ({counter.calls} UNet calls, {counter.rows} rows)")
        return out

    chosen = set(args.cases.split(","))
    # Without the InstaFlow case the refiner gets a smooth stand-in image of the same size.
    image = PIL.Image.linear_gradient("L").resize((args.size, args.size)).convert("RGB")
    if "instaflow" in chosen:
        image = t2i_case("InstaFlow 1 step, no CFG", instaflow).images[0]
    if "perflow" in chosen:
        t2i_case("PeRFlow 4 steps + CFG 4.5", perflow, num_inference_steps=4, guidance_scale=4.5)
    if args.upscale and "refiner" in chosen:

        def refine():
            counter.reset()
            return refiner(image, prompt, size=args.upscale, seed=0)

        seconds, out = _time(refine, args.runs, args.warmup)
        cases.append(
            {
                "name": f"Refiner {args.size}² → {args.upscale}² (4 steps + CFG 4.5, ControlNet-Tile)",
                "size": args.upscale,
                "num_inference_steps": out.settings["num_inference_steps"],
                "guidance_scale": out.settings["guidance_scale"],
                "unet_calls": counter.calls,  # UNet + ControlNet forwards
                "unet_rows": counter.rows,
                "seconds": seconds,
                "median_s": statistics.median(seconds),
            }
        )
        print(f"refiner: {statistics.median(seconds):.2f} s ({counter.calls} UNet+ControlNet calls)")
    record = {
        "schema": "t2mv-benchmark/1",
        "kind": "fast text-to-image: InstaFlow vs PeRFlow, PeRFlow-Refiner",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m benchmarks.instaflow "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "mode": "real (random weights)",
        "device": "cpu",
        "dtype": "fp32",
        "notes": args.note,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "unet_params": configs.__dict__.get("SD15_UNET_PARAMS"),
        },
        "build_seconds": build_seconds,
        "cases": cases,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
