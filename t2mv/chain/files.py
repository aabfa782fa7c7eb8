"""The chain's file conventions, shared by every stage's writer: mesh formats, the failure marker, JSON, strips.

A leaf of the chain package: it imports nothing else of the chain, so the stages, the result and the runner can all
use it without an import circle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from ..errors import BadInputError
from ..inputs import write_image

MESH_FORMATS = ("glb", "obj", "ply", "stl")
FAILED_MARKER = "FAILED.json"
VIEW_KINDS = ("normal", "color")
_VIEW_FILE = re.compile(r"^(normal|color)_(\d+)_(\w+)\.png$")


def view_file(kind: str, index: int, view: str) -> str:
    """The one name of a view image, for the chain and ``t2mv-multiview`` alike: ``color_0_front.png``."""
    assert kind in VIEW_KINDS, kind
    return f"{kind}_{index}_{view}.png"


class Views(NamedTuple):
    """The six views read back from a folder: names in file order, and the images (RGB) in that order."""

    view_names: tuple[str, ...]
    normals: list[Image.Image]
    colors: list[Image.Image]


def read_views(folder: str | os.PathLike) -> Views:
    """The normal and colour views of a folder written by ``t2mv text-to-mesh`` / ``image-to-mesh`` / ``batch`` or
    ``t2mv-multiview`` (`view_file` names), in view order.

    Raises:
        BadInputError: the folder has no views, or its normal and colour views do not pair up (0 .. n-1 each,
            the same view names).
    """
    folder = Path(folder)
    found: dict[str, dict[int, tuple[str, Path]]] = {kind: {} for kind in VIEW_KINDS}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _VIEW_FILE.match(path.name)
        if match:
            found[match[1]][int(match[2])] = (match[3], path)
    names = {kind: [found[kind][i][0] for i in sorted(found[kind])] for kind in VIEW_KINDS}
    complete = all(sorted(found[kind]) == list(range(len(found[kind]))) for kind in VIEW_KINDS)
    if not names["normal"] or names["normal"] != names["color"] or not complete:
        raise BadInputError(
            f"{folder} holds no complete set of views ({view_file('normal', 0, '<view>')}, "
            f"{view_file('color', 0, '<view>')}, ... for each view): found {sum(map(len, found.values()))} view files."
        )
    images = {kind: [Image.open(found[kind][i][1]).convert("RGB") for i in sorted(found[kind])] for kind in VIEW_KINDS}
    return Views(tuple(names["normal"]), images["normal"], images["color"])


def to_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, anything unknown as its str): same record, same file."""
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def check_mesh_formats(formats: Sequence[str]) -> list[str]:
    """Normalised mesh formats (``"GLB"``, ``".obj"`` → ``"glb"``, ``"obj"``); BadInputError for unknown ones."""
    names = [str(fmt).lower().lstrip(".") for fmt in formats]
    unknown = [name for name in names if name not in MESH_FORMATS]
    if unknown:
        raise BadInputError(f"mesh format must be glb, obj, ply or stl, got {', '.join(map(repr, unknown))}.")
    return list(dict.fromkeys(names))


def horizontal_strip(images: Sequence[Image.Image]) -> Image.Image:
    """The images side by side, left to right, all at the first image's size: six 256² views → 1536×256 RGB."""
    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return strip


def candidate_file(index: int) -> str:
    """``candidate_<k>.png``: the k-th image of a best-of-N run."""
    return f"candidate_{index}.png"


def write_candidates(result: Any, folder: Path, mesh_formats: Sequence[str]) -> dict[str, Path]:
    """``candidate_0.png`` … ``candidate_{N-1}.png`` (nothing for a single image: that one is ``image.png``)."""
    if len(result.candidates) < 2:
        return {}
    return {
        f"candidate_{k}": write_image(image, folder / candidate_file(k)) for k, image in enumerate(result.candidates)
    }
