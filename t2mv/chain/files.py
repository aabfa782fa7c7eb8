"""The chain's file conventions, shared by every stage's writer: mesh formats, the failure marker, JSON, strips.

A leaf of the chain package: it imports nothing else of the chain, so the stages, the result and the runner can all
use it without an import circle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..errors import BadInputError

MESH_FORMATS = ("glb", "obj", "ply")
FAILED_MARKER = "FAILED.json"


def to_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, anything unknown as its str): same record, same file."""
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def check_mesh_formats(formats: Sequence[str]) -> list[str]:
    """Normalised mesh formats (``"GLB"``, ``".obj"`` → ``"glb"``, ``"obj"``); BadInputError for unknown ones."""
    names = [str(fmt).lower().lstrip(".") for fmt in formats]
    unknown = [name for name in names if name not in MESH_FORMATS]
    if unknown:
        raise BadInputError(f"mesh format must be glb, obj or ply, got {', '.join(map(repr, unknown))}.")
    return list(dict.fromkeys(names))


def horizontal_strip(images: Sequence[Image.Image]) -> Image.Image:
    """The images side by side, left to right, all at the first image's size: six 256² views → 1536×256 RGB."""
    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return strip
