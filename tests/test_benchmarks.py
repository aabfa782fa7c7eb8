"""benchmarks/: the tiny benchmark end to end (JSON schema, finite positive numbers) and the measuring parts.

No timing thresholds: speed is measured by the benchmarks, never asserted by tests.
"""

import json
import math
import mmap
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import SCHEMA, configs  # noqa: E402
from benchmarks.harness import CallRecorder, PeakMemory, count_flops, max_diffs, summarize, time_runs  # noqa: E402
from benchmarks.report import markdown  # noqa: E402
from benchmarks.run import main  # noqa: E402
from benchmarks.variants import TOLERANCE  # noqa: E402

ALL_STAGES = "t2i,multiview,triposr,mesh,texture,export,chain"


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _run(tmp_path, *argv):
    out = tmp_path / "report.json"
    code = main(
        [*argv, "--tiny", "--warmup", "0", "--t2i-steps", "4", "--mv-steps", "4", "--mc-res", "32"]
        + ["--out", str(out), "--quiet"]
    )
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """Every stage and the chain, one timed run each (the tiny multiview stage alone takes seconds)."""
    return _run(tmp_path_factory.mktemp("bench"), "--stages", ALL_STAGES, "--runs", "1")


def _check_case(case, runs):
    t = case["time_s"]
    assert t["n"] == runs and len(t["values"]) == runs
    assert all(_positive(t[k]) for k in ("median", "mean", "min", "max"))
    assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"] and t["iqr"] >= 0
    assert _positive(case["peak_host_rss_bytes"]) and case["peak_gpu_bytes"] is None
    if case["stage"] != "export":  # exporting writes files: no tensor compute
        assert _positive(case["flops"]["total"]) and _positive(case["achieved_gflop_per_s"])
        assert case["flops"]["total"] == sum(case["flops"]["by_module"].values())


def test_tiny_run_schema_and_values(tiny_report):
    code, report = tiny_report
    errors = [(c["name"], c["error"]) for c in report["cases"] if c.get("error")]
    assert code == 0 and not errors, errors
    assert report["schema"] == SCHEMA and report["mode"] == "tiny" and report["device"] == "cpu"
    assert report["gpu_measured"] is False and any("No GPU" in n for n in report["notes"])
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["torch_num_threads"] >= 1 and env["dtype"] == "float32"
    assert {c["stage"] for c in report["cases"]} == set(ALL_STAGES.split(","))
    for case in report["cases"]:
        _check_case(case, runs=1)
    # The call pattern shows CFG as one UNet batch, encoders run once and a single 12-view decode.
    t2i = next(c for c in report["cases"] if c["stage"] == "t2i")
    assert t2i["calls"]["unet"] == {"calls": 4, "batch_sizes": [2], "rows": 8}
    mv = next(c for c in report["cases"] if c["stage"] == "multiview")
    assert mv["calls"]["unet"]["calls"] == 4 and mv["calls"]["vae.decoder"]["batch_sizes"] == [12]
    assert mv["calls"]["image_encoder"]["calls"] == 1 and mv["calls"]["vae.encoder"]["calls"] == 1
    mesh = next(c for c in report["cases"] if c["stage"] == "mesh")
    assert mesh["result"]["faces"] > 0
    export = [c for c in report["cases"] if c["stage"] == "export"]
    assert {c["params"]["format"] for c in export} == {"glb", "obj", "ply"}
    assert all(_positive(c["result"]["bytes"]) for c in export)
    chain = next(c for c in report["cases"] if c["stage"] == "chain")
    assert _positive(chain["result"]["stage_timings_s"]["total"]) and chain["result"]["faces"] > 0


def test_tiny_run_variants(tmp_path):
    code, report = _run(
        tmp_path, "--stages", "t2i,triposr", "--runs", "2", "--variants", "sdpa-math,bf16,fp16,xformers"
    )
    assert code == 0
    for case in report["cases"]:
        _check_case(case, runs=2)
    by_key = {(v["stage"], v["variant"]): v for v in report["variants"]}
    for stage in ("t2i", "triposr"):
        ref = by_key[(stage, "reference fp32 sdpa")]
        assert ref["max_abs_diff"] == 0.0 and _positive(ref["time_s"]["median"])
        math_attn = by_key[(stage, "sdpa-math")]
        assert math_attn["error"] is None and math_attn["within_tolerance"], math_attn
        bf16 = by_key[(stage, "bf16")]
        assert bf16["error"] is None and math.isfinite(bf16["max_abs_diff"]) and bf16["max_abs_diff"] > 0
        # bf16 really ran in bf16 (it differs) and still matches the fp32 reference within the half tolerance
        assert bf16["within_tolerance"] and bf16["max_abs_diff"] <= TOLERANCE["half"], bf16
        assert "CPU" in by_key[(stage, "fp16")]["skipped"] and "CUDA" in by_key[(stage, "xformers")]["skipped"]
    table = markdown(report)
    assert "| t2i | sdpa-math |" in table and "unet 4×b2" in table


def test_summarize_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["iqr"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    assert s["values"] == [4.0, 1.0, 3.0, 2.0, 5.0] and s["n"] == 5
    with pytest.raises(ValueError, match="runs >= 1"):
        summarize([])


def test_time_runs_counts_calls():
    calls = []
    times, warm, result = time_runs(lambda: calls.append(1) or len(calls), runs=3, warmup=2, device="cpu")
    assert len(times) == 3 and len(warm) == 2 and result == 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="runs >= 1"):
        time_runs(lambda: None, runs=0, warmup=0, device="cpu")


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        # A fresh anonymous mapping, written page by page: new resident memory whatever the heap already holds.
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        block.close()
    assert big.host_peak_bytes - small.host_peak_bytes > 48 * 2**20, (big, small)
    assert big.gpu_peak_bytes is None


def test_meta_replay_flops_match_a_real_count():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        sample_size=16,
        layers_per_block=1,
    ).eval()
    unet.set_attn_processor(AttnProcessor())  # explicit matmuls: counted on any device

    def call():
        return unet(torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 7, 32))

    with torch.no_grad():
        real = count_flops(call)["total"]
        recorder = CallRecorder({"unet": unet})
        with recorder:
            call()
            call()
    assert recorder.pattern() == {"unet": {"calls": 2, "batch_sizes": [2], "rows": 4}}
    assert recorder.flops()["total"] == 2 * real > 0


def test_max_diffs():
    ref = torch.tensor([1.0, -2.0, 0.5])
    d = max_diffs(ref + torch.tensor([0.0, 0.1, 0.0]), ref)
    assert d["max_abs_diff"] == pytest.approx(0.1) and d["max_rel_diff"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="shape"):
        max_diffs(ref[:2], ref)


def test_real_configs_match_the_manifests(fixtures_dir):
    """The real-size random models are the published architectures (parameter counts from the manifests)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from triposr import TSR
    from triposr.config import TSRConfig
    from wonder3d_perflow.unet_mv2d import UNetMV2DConditionModel

    manifests = fixtures_dir / "manifests"
    expected = {
        "sd15": json.loads((manifests / "sd15_unet_keys.json").read_text())["num_params"],
        "wonder3d": json.loads((manifests / "wonder3d_unet_keys.json").read_text())["num_params"],
        "triposr": 419_275_628,  # manifests/triposr_README.md
    }
    with torch.device("meta"):
        built = {
            "sd15": UNet2DConditionModel(**configs.SD15_UNET),
            "wonder3d": UNetMV2DConditionModel.from_config(configs.WONDER3D_UNET),
            "triposr": TSR(TSRConfig.from_dict(configs.TRIPOSR)),
        }
        text = CLIPTextModel(CLIPTextConfig(**configs.CLIP_L_TEXT))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()}
    assert counts == expected
    assert text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77


def test_standin_tokenizer(tmp_path):
    tok = configs.standin_clip_tokenizer(tmp_path)
    assert len(tok) == configs.CLIP_VOCAB_SIZE
    ids = tok("a red teapot", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and max(ids) < configs.CLIP_VOCAB_SIZE


def test_diffusion_levers_side_by_side(tmp_path):
    """benchmarks.compile_speed on the tiny T2I: every lever against the eager path, with output differences.
    backend="eager" (dynamo capture, no code generation) keeps it short; the measured runs use inductor."""
    from benchmarks import compile_speed

    out = tmp_path / "levers.json"
    argv = ["--tiny", "--stages", "t2i", "--runs", "1", "--backend", "eager", "--out", str(out), "--quiet"]
    assert compile_speed.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA and report["kind"] == "diffusion speed levers" and report["device"] == "cpu"
    levers = {r["lever"]: r for r in report["levers"]}
    assert set(levers) == {
        "eager (current path)",
        "text encoder: one batch (ours) vs two calls",
        "sdpa kernels (eager call, profiler)",
        "channels-last (unet + vae)",
        "compile (eager, mode=None): first call",
        "compile (eager, mode=None)",
    }
    assert _positive(levers["eager (current path)"]["time_s"]["median"])
    text = levers["text encoder: one batch (ours) vs two calls"]
    assert text["max_abs_diff"] <= 1e-5 and _positive(text["speedup_vs_two_calls"])
    assert set(levers["sdpa kernels (eager call, profiler)"]["kernels"]) == {"flash (cpu)"}
    compiled = levers["compile (eager, mode=None)"]
    assert _positive(compiled["compile_s"]) and compiled["compiled_after_first_call"] is True
    assert compiled["max_abs_diff"] == 0.0 and _positive(compiled["speedup_vs_eager"])
    assert levers["channels-last (unet + vae)"]["max_abs_diff"] < 1e-4


def test_compile_variants_are_registered():
    from benchmarks.variants import parse_variants, unavailable_reason

    compiled, graphs = parse_variants(["compile", "compile-cudagraphs"])
    assert compiled.compile and compiled.compile_mode is None
    assert graphs.compile and graphs.compile_mode == "reduce-overhead"
    assert "CUDA" in unavailable_reason(graphs, torch.device("cpu"))
