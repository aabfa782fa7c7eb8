"""Every command against bad inputs and bad options (issue 11): exit code, one clear line, no traceback, nothing
half-written, earlier results kept.

The table runs each command in-process through its ``main(argv)`` in smoke mode (``--tiny``); almost every case
must fail before any model loads, so the table is fast. Two cases run as real subprocesses to prove that the
installed entry points print no traceback either.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from t2mv import cli, mesh_cli, multiview_cli

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = {"t2mv": cli.main, "t2mv-multiview": multiview_cli.main, "t2mv-mesh": mesh_cli.main}
READ_ONLY = "/proc/t2mv-bad-inputs"  # a read-only file system, even for root


def forged_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width × height (no pixel data): size checks must read the header only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One of every kind of bad (and one good) input file."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good.png"
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((200, 40, 40, 255), (16, 12, 48, 52))
    image.save(good)
    made = {"good": good}
    made["text"] = root / "notes.png"
    made["text"].write_text("not an image")
    made["empty"] = root / "empty.png"
    made["empty"].write_bytes(b"")
    made["tiny"] = root / "dot.png"
    Image.new("RGB", (1, 1)).save(made["tiny"])
    made["bomb"] = forged_png(root / "bomb.png", 20000, 20000)  # PIL's own decompression-bomb error
    made["huge"] = forged_png(root / "huge.png", 9000, 9000)  # over our limit, under PIL's
    made["clear"] = root / "clear.png"
    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(made["clear"])
    made["truncated"] = root / "cut.png"
    made["truncated"].write_bytes(good.read_bytes()[:120])
    made["folder"] = root / "a-folder"
    made["folder"].mkdir()
    made["no_images"] = root / "no-images"
    made["no_images"].mkdir()
    (made["no_images"] / "readme.txt").write_text("no images here")
    made["taken"] = root / "taken"
    made["taken"].write_text("somebody's file")
    made["existing_views"] = root / "views"
    made["existing_views"].mkdir()
    (made["existing_views"] / "old.txt").write_text("old")
    made["prompts_empty"] = root / "empty.txt"
    made["prompts_empty"].write_text("\n# only a comment\n")
    made["prompts_bad_json"] = root / "bad.jsonl"
    made["prompts_bad_json"].write_text('{"prompt": "a cat", \n')
    made["prompts"] = root / "prompts.txt"
    made["prompts"].write_text("a red teapot\n")
    made["no_model"] = root / "no-model"
    made["no_model"].mkdir()
    return made


def out(name: str) -> str:
    return f"{{tmp}}/{name}"


# (id, command, argv, exit code, text the error line must contain). {good}, {text}, ... are the files above;
# {tmp} a fresh folder per case, which must hold nothing afterwards (no half-written output).
CASES = [
    # t2mv image
    (
        "image-steps-below-windows",
        "t2mv",
        ["image", "a cat", "--t2i-steps", "2", "-o", out("a.png")],
        2,
        "--t2i-steps",
    ),
    (
        "image-steps-below-1",
        "t2mv",
        ["image", "a cat", "--t2i-steps", "0", "-o", out("a.png")],
        2,
        "--t2i-steps must be an integer in [1, 100]",
    ),
    ("image-seed-too-big", "t2mv", ["image", "a cat", "--seed", str(2**70), "-o", out("a.png")], 2, "4294967295"),
    ("image-seed-negative", "t2mv", ["image", "a cat", "--seed", "-5", "-o", out("a.png")], 2, "--seed"),
    ("image-seed-not-a-number", "t2mv", ["image", "a cat", "--seed", "abc", "-o", out("a.png")], 2, "invalid int"),
    ("image-height-not-8", "t2mv", ["image", "a cat", "--height", "100", "-o", out("a.png")], 2, "multiple of 8"),
    ("image-cfg-nan", "t2mv", ["image", "a cat", "--t2i-guidance", "nan", "-o", out("a.png")], 2, "finite"),
    ("image-empty-prompt", "t2mv", ["image", "   ", "-o", out("a.png")], 2, "prompt is empty"),
    ("image-bad-extension", "t2mv", ["image", "a cat", "-o", out("a.txt")], 2, ".png, .jpg"),
    ("image-read-only", "t2mv", ["image", "a cat", "-o", READ_ONLY + "/a.png"], 2, "not writable"),
    ("image-under-a-file", "t2mv", ["image", "a cat", "-o", "{taken}/a.png"], 2, "is a file"),
    ("image-device", "t2mv", ["image", "a cat", "--device", "nonsense", "-o", out("a.png")], 2, "not a device"),
    ("image-device-meta", "t2mv", ["image", "a cat", "--device", "meta", "-o", out("a.png")], 2, "not supported"),
    (
        "image-fp16-cpu",
        "t2mv",
        ["image", "a cat", "--device", "cpu", "--dtype", "float16", "-o", out("a.png")],
        2,
        "CPU",
    ),
    ("image-mesh-flag", "t2mv", ["image", "a cat", "--triposr-model", "x", "-o", out("a.png")], 2, "unrecognized"),
    # t2mv text-to-mesh
    ("t2m-threshold-nan", "t2mv", ["text-to-mesh", "a cat", "--mc-threshold", "nan", "-o", out("o")], 2, "finite"),
    ("t2m-mv-steps-2", "t2mv", ["text-to-mesh", "a cat", "--mv-steps", "2", "-o", out("o")], 2, "--mv-steps"),
    ("t2m-resolution", "t2mv", ["text-to-mesh", "a cat", "--mc-resolution", "1024", "-o", out("o")], 2, "512"),
    ("t2m-texture", "t2mv", ["text-to-mesh", "a cat", "--texture-size", "100", "-o", out("o")], 2, "4096"),
    ("t2m-simplify", "t2mv", ["text-to-mesh", "a cat", "--simplify", "2", "-o", out("o")], 2, "--simplify"),
    ("t2m-output-is-a-file", "t2mv", ["text-to-mesh", "a cat", "-o", "{taken}"], 2, "existing file"),
    ("t2m-read-only", "t2mv", ["text-to-mesh", "a cat", "-o", READ_ONLY], 2, "not writable"),
    ("t2m-format", "t2mv", ["text-to-mesh", "a cat", "--format", "fbx", "-o", out("o")], 2, "unknown mesh format"),
    ("t2m-device-index", "t2mv", ["text-to-mesh", "a cat", "--device", "cuda:99", "-o", out("o")], 2, "cuda:99"),
    ("t2m-old-flag", "t2mv", ["text-to-mesh", "a cat", "--mc-res", "64", "-o", out("o")], 2, "unrecognized"),
    ("t2m-preprocess", "t2mv", ["text-to-mesh", "a cat", "--mv-preprocess", "x", "-o", out("o")], 2, "invalid"),
    # t2mv image-to-mesh
    ("i2m-not-an-image", "t2mv", ["image-to-mesh", "{text}", "-o", out("o")], 2, "not an image"),
    ("i2m-zero-bytes", "t2mv", ["image-to-mesh", "{empty}", "-o", out("o")], 2, "empty"),
    ("i2m-1x1", "t2mv", ["image-to-mesh", "{tiny}", "-o", out("o")], 2, "at least 16 pixels"),
    ("i2m-bomb", "t2mv", ["image-to-mesh", "{bomb}", "-o", out("o")], 2, "too large"),
    ("i2m-huge", "t2mv", ["image-to-mesh", "{huge}", "-o", out("o")], 2, "Downscale"),
    ("i2m-transparent", "t2mv", ["image-to-mesh", "{clear}", "-o", out("o")], 2, "fully transparent"),
    ("i2m-truncated", "t2mv", ["image-to-mesh", "{truncated}", "-o", out("o")], 2, "damaged or truncated"),
    ("i2m-missing", "t2mv", ["image-to-mesh", "{tmp}/absent.png", "-o", out("o")], 2, "does not exist"),
    ("i2m-folder", "t2mv", ["image-to-mesh", "{folder}", "-o", out("o")], 2, "not a file"),
    ("i2m-device", "t2mv", ["image-to-mesh", "{good}", "--device", "gpu", "-o", out("o")], 2, "not a device"),
    ("i2m-ratio", "t2mv", ["image-to-mesh", "{good}", "--mesh-foreground-ratio", "1.5", "-o", out("o")], 2, "ratio"),
    # t2mv batch
    ("batch-no-file", "t2mv", ["batch", "{tmp}/absent.txt", "-o", out("o")], 2, "does not exist"),
    ("batch-no-prompts", "t2mv", ["batch", "{prompts_empty}", "-o", out("o")], 2, "no prompts"),
    ("batch-bad-json", "t2mv", ["batch", "{prompts_bad_json}", "-o", out("o")], 2, "not valid JSON"),
    ("batch-mv-steps", "t2mv", ["batch", "{prompts}", "--mv-steps", "2", "-o", out("o")], 2, "--mv-steps"),
    ("batch-output-is-a-file", "t2mv", ["batch", "{prompts}", "-o", "{taken}"], 2, "existing file"),
    ("batch-device", "t2mv", ["batch", "{prompts}", "--device", "cuda:99", "-o", out("o")], 2, "cuda:99"),
    # t2mv-multiview
    ("mv-not-an-image", "t2mv-multiview", ["{text}", "-o", out("v")], 2, "not an image"),
    ("mv-zero-bytes", "t2mv-multiview", ["{empty}", "-o", out("v")], 2, "empty"),
    ("mv-bomb", "t2mv-multiview", ["{bomb}", "-o", out("v")], 2, "too large"),
    ("mv-transparent", "t2mv-multiview", ["{clear}", "-o", out("v")], 2, "fully transparent"),
    ("mv-seed-too-big", "t2mv-multiview", ["{good}", "--seed", str(2**70), "-o", out("v")], 2, "--seed"),
    ("mv-cfg-nan", "t2mv-multiview", ["{good}", "--mv-guidance", "nan", "-o", out("v")], 2, "--mv-guidance must be"),
    ("mv-steps-unbounded", "t2mv-multiview", ["{good}", "--mv-steps", "100000", "-o", out("v")], 2, "--mv-steps"),
    ("mv-old-flag", "t2mv-multiview", ["{good}", "--steps", "8", "-o", out("v")], 2, "--steps is now --mv-steps"),
    ("mv-device", "t2mv-multiview", ["{good}", "--device", "nonsense", "-o", out("v")], 2, "not a device"),
    ("mv-device-index", "t2mv-multiview", ["{good}", "--device", "cuda:99", "-o", out("v")], 2, "cuda:99"),
    ("mv-mesh-flag", "t2mv-multiview", ["{good}", "--mc-resolution", "64", "-o", out("v")], 2, "unrecognized"),
    ("mv-exists", "t2mv-multiview", ["{good}", "-o", "{existing_views}"], 2, "already exists"),
    ("mv-overwrite-a-file", "t2mv-multiview", ["{good}", "--overwrite", "-o", "{taken}"], 2, "existing file"),
    ("mv-read-only", "t2mv-multiview", ["{good}", "-o", READ_ONLY], 2, "not writable"),
    # t2mv-mesh
    ("mesh-bomb", "t2mv-mesh", ["{bomb}", "-o", out("m")], 2, "too large"),
    ("mesh-1x1", "t2mv-mesh", ["{tiny}", "-o", out("m")], 2, "at least 16 pixels"),
    ("mesh-device", "t2mv-mesh", ["{good}", "--device", "nonsense", "-o", out("m")], 2, "not a device"),
    ("mesh-device-index", "t2mv-mesh", ["{good}", "--device", "cuda:99", "-o", out("m")], 2, "cuda:99"),
    ("mesh-old-flag", "t2mv-mesh", ["{good}", "--no-rembg", "-o", out("m")], 2, "--no-rembg is now --no-remove-bg"),
    ("mesh-format", "t2mv-mesh", ["{good}", "-o", out("m"), "--format", "glb", "fbx"], 2, "unknown mesh format"),
    ("mesh-output-is-a-file", "t2mv-mesh", ["{good}", "-o", "{taken}"], 2, "existing file"),
    ("mesh-chunk", "t2mv-mesh", ["{good}", "--chunk-size", "0", "-o", out("m")], 2, "--chunk-size"),
    ("mesh-no-images", "t2mv-mesh", ["{no_images}", "-o", out("m")], 2, "has no images"),
    ("mesh-threshold-inf", "t2mv-mesh", ["{good}", "--mc-threshold", "inf", "-o", out("m")], 2, "--mc-threshold"),
]


def fill(argv: list[str], files: dict[str, Path], tmp: Path) -> list[str]:
    names = {key: str(path) for key, path in files.items()}
    return [arg.format(tmp=tmp, **names) for arg in argv]


def snapshot(files: dict[str, Path]) -> dict[str, str]:
    return {"taken": files["taken"].read_text(), "views": ",".join(sorted(os.listdir(files["existing_views"])))}


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_no_output(case, files, tmp_path, capsys, monkeypatch):
    name, command, argv, code, expected = case
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    before = snapshot(files)
    argv = [*fill(argv, files, tmp_path), "--tiny"]
    assert COMMANDS[command](argv) == code, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one clear line: no usage block, no banner, no traceback
    assert lines[0].startswith(command) and "error:" in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "absent.png") == []  # nothing written
    assert snapshot(files) == before  # existing files and folders untouched


@pytest.mark.parametrize(
    "command, argv",
    [
        ("t2mv", ["image", "a cat", "-o", "{tmp}/a.png"]),
        ("t2mv", ["text-to-mesh", "a cat", "-o", "{tmp}/o"]),
        ("t2mv", ["image-to-mesh", "{good}", "-o", "{tmp}/o"]),
        ("t2mv", ["batch", "{prompts}", "-o", "{tmp}/o"]),
        ("t2mv", ["app"]),
        ("t2mv-multiview", ["{good}", "-o", "{tmp}/v"]),
        ("t2mv-mesh", ["{good}", "-o", "{tmp}/m"]),
    ],
    ids=["image", "text-to-mesh", "image-to-mesh", "batch", "app", "multiview", "mesh"],
)
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "real"])
def test_cuda_without_cuda_is_bad_input_on_every_command(command, argv, tiny, files, tmp_path, capsys, monkeypatch):
    """Issue 16: ``--device cuda`` on a machine without CUDA exited 1 with "Torch not compiled with CUDA enabled"
    after the loading started. Now: exit 2, one line, nothing loaded or written (CUDA hidden here, so the test
    means the same on a GPU machine)."""
    import torch

    from t2mv.chain import TextTo3D

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may load for an unusable device")

    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(TextTo3D, "from_pretrained", no_loading)
    monkeypatch.setattr(TextTo3D, "tiny", no_loading)
    argv = [*fill(argv, files, tmp_path), "--device", "cuda", *(["--tiny"] if tiny else [])]
    assert COMMANDS[command](argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--device cuda:" in lines[0] and "--device cpu" in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out and list(tmp_path.iterdir()) == []


def test_a_t2i_model_that_is_neither_kind_is_bad_input(tmp_path, capsys, monkeypatch):
    """Issue 19: a --t2i-model whose model_index.json names neither an SD1.5 (PeRFlow) nor a rectified-flow pipeline
    is refused at the edge, from that file alone: exit 2, one line naming both kinds, nothing loaded or written."""
    from t2mv.chain import TextTo3D

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may load for a model of neither kind")

    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    monkeypatch.setattr(TextTo3D, "from_pretrained", no_loading)
    argv = ["image", "a cat", "--t2i-model", str(folder), "--device", "cpu", "-o", str(tmp_path / "a.png")]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "StableDiffusionXLPipeline" in lines[0] and "RectifiedFlowPipeline" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl"]


def test_the_table_is_big_enough_and_covers_every_command():
    assert len(CASES) >= 30
    used = {command for _, command, *_ in CASES}
    subcommands = {argv[0] for _, command, argv, *_ in CASES if command == "t2mv"}
    assert used == set(COMMANDS) and subcommands == {"image", "text-to-mesh", "image-to-mesh", "batch"}


def test_missing_weights_exit_3_for_every_command(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    runs = [
        (cli.main, ["image-to-mesh", str(files["good"]), "--no-multiview", "-o", str(tmp_path / "a")]),
        (multiview_cli.main, [str(files["good"]), "-o", str(tmp_path / "b"), "--no-multiview-delta"]),
        (mesh_cli.main, [str(files["good"]), "--triposr-model", str(files["no_model"]), "-o", str(tmp_path / "c")]),
    ]
    for main, argv in runs:
        assert main([*argv, "--device", "cpu"]) == 3, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--tiny" in err[0] and "Traceback" not in err[0], err
    assert not [p for p in tmp_path.iterdir() if p.name != "empty-cache"]


def test_late_failure_keeps_the_earlier_stages(tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["text-to-mesh", "a red teapot", "--tiny", "--no-multiview", "--mc-threshold", "1e30", "-o", str(output)]
    assert cli.main(argv) == 2  # no surface at that threshold: a setting the user can change
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "mesh stage failed" in err[0] and "FAILED.json" in err[0]
    names = sorted(p.name for p in output.iterdir())
    assert names == [
        "FAILED.json",
        "image.png",
        "mesh_input.png",
        "settings.json",
        "timings.json",
    ]  # no partial mesh file
    assert json.loads((output / "FAILED.json").read_text())["failed_stage"] == "mesh"


@pytest.mark.parametrize(
    "module, args",
    [
        ("t2mv.cli", ["image-to-mesh", "{bomb}", "--tiny", "-o", "{tmp}/o"]),
        ("t2mv.mesh_cli", ["{clear}", "--tiny", "-o", "{tmp}/m"]),
    ],
)
def test_real_process_prints_one_line_and_no_traceback(module, args, files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *fill(args, files, tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
