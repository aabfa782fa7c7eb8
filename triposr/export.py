"""Write meshes to GLB, OBJ (+MTL/PNG when textured), PLY or STL, atomically.

Meshes are written exactly as given: they are already in the export frame (glTF: +Y up, the input view's front
facing +Z; see `triposr.mesh`), so no format gets a rotation of its own.

- GLB: vertex colours as COLOR_0 (normalised uint8 RGBA) with an explicit matte material (glTF's default material
  is fully metallic, which makes vertex-coloured meshes look dark in viewers); a baked texture is embedded as the
  base colour texture of the same kind of matte material.
- OBJ: vertex colours with the common extension `v x y z r g b` (floats in [0, 1]); a baked texture goes to
  `<stem>.mtl` + `<stem>.png` next to the OBJ (Kd 1, map_Kd).
- PLY (binary): vertex colours; a textured mesh is written with colours sampled from its texture at the vertices.
- STL (binary): geometry only, for 3D printing, in the same units as the other formats (the object spans about one
  unit; STL has no unit and slicers read millimetres, so scale it in the slicer). A mesh that is not watertight
  (an edge without exactly two faces) is written with a warning (`stl_warning`): slicers may refuse or misprint it.

Reading back: `trimesh.load(path, force="mesh")` drops a GLB's COLOR_0 when the primitive has a material (trimesh
keeps it only in the scene's `visual.vertex_attributes["color"]`); `load_mesh` here restores it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from pathlib import Path

import trimesh

FORMATS = ("glb", "obj", "ply", "stl")

logger = logging.getLogger(__name__)
_STL_WARNED: dict[str, None] = {}  # STL files already warned about (resolved paths), oldest first

_MATTE = {
    "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}
}


def is_textured(mesh: trimesh.Trimesh) -> bool:
    """A UV mesh whose material has a base colour image (PBR or simple material)."""
    if mesh.visual.kind != "texture" or mesh.visual.uv is None:
        return False
    material = mesh.visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    return image is not None


def _glb_with_matte_material(glb: bytes) -> bytes:
    """Give every primitive without a material an explicit non-metallic one (rewrites the GLB JSON chunk)."""
    magic, version, _ = struct.unpack_from("<4sII", glb, 0)
    json_len, json_type = struct.unpack_from("<I4s", glb, 12)
    if magic != b"glTF" or json_type != b"JSON":
        raise ValueError("not a binary glTF file")
    tree = json.loads(glb[20 : 20 + json_len])
    rest = glb[20 + json_len :]  # the BIN chunk, header included
    primitives = [p for m in tree.get("meshes", []) for p in m["primitives"] if "material" not in p]
    if not primitives:
        return glb
    materials = tree.setdefault("materials", [])
    materials.append(dict(_MATTE, name="vertex_color_matte"))
    for primitive in primitives:
        primitive["material"] = len(materials) - 1
    text = json.dumps(tree, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    body = struct.pack("<I4s", len(text), b"JSON") + text + rest
    return struct.pack("<4sII", magic, version, 12 + len(body)) + body


def _mtl(material_name: str, texture_name: str) -> bytes:
    # Kd 1: most OBJ viewers multiply the texture by Kd (trimesh writes 0.4, which darkens it).
    return (
        f"newmtl {material_name}\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nNs 1.0\nillum 1\n"
        f"map_Kd {texture_name}\n"
    ).encode()


def _encode(mesh: trimesh.Trimesh, path: Path) -> dict[str, bytes]:
    """File name -> bytes of everything `path` needs (the mesh file first)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "glb":
        return {path.name: _glb_with_matte_material(mesh.export(file_type="glb"))}
    if suffix == "ply":
        if is_textured(mesh):
            mesh = mesh.copy()
            mesh.visual = mesh.visual.to_color()
        return {path.name: mesh.export(file_type="ply", encoding="binary")}
    if suffix == "obj":
        from trimesh.exchange.obj import export_obj

        if not is_textured(mesh):
            return {path.name: export_obj(mesh, include_color=True, include_texture=False).encode()}
        mtl_name, texture_name = f"{path.stem}.mtl", f"{path.stem}.png"
        text, files = export_obj(
            mesh, include_color=False, include_texture=True, return_texture=True, mtl_name=mtl_name
        )
        material = next(line.split(maxsplit=1)[1] for line in text.splitlines() if line.startswith("usemtl "))
        image = next(data for name, data in files.items() if not name.endswith(".mtl"))
        return {path.name: text.encode(), mtl_name: _mtl(material, texture_name), texture_name: image}
    if suffix == "stl":
        return {path.name: mesh.export(file_type="stl")}  # binary STL: triangles and facet normals only
    raise ValueError(f"unsupported mesh format {path.suffix!r} for {path}; use one of .glb, .obj, .ply, .stl")


def stl_warning(mesh: trimesh.Trimesh, name: str = "mesh.stl") -> str | None:
    """The warning an STL of `mesh` needs (None when it is watertight: every edge shared by exactly two faces).

    Judged on the geometry with coincident vertices merged, as STL stores it and slicers read it: a textured mesh
    splits its vertices along UV seams, which is no hole.
    """
    if trimesh.Trimesh(mesh.vertices, mesh.faces, process=True).is_watertight:  # process: merge by position
        return None
    return (
        f"{name} is not watertight (it has open or non-manifold edges); a slicer may refuse or misprint it: "
        "repair it first (e.g. in your slicer or Blender's 3D-Print toolbox)"
    )


def _create_temporary(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden file next to its final name, created with mode 0666 less the umask like any ordinary output
    (`tempfile.mkstemp` creates 0600, and `os.replace` would keep that mode on the mesh files)."""
    while True:
        tmp = str(folder / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # a name collision (2^-48): draw another
            continue


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike) -> list[Path]:
    """Write `mesh` to `path`, format by suffix (.glb, .obj, .ply, .stl); returns every file written.

    Each file is written to a temporary name in the target folder and renamed into place only once all of them
    are complete, so an error never leaves a half-written mesh behind.
    """
    path = Path(path)
    if len(mesh.faces) == 0:
        raise ValueError(f"refusing to write an empty mesh to {path}")
    files = _encode(mesh, path)
    # Once per file: the chain writes mesh.stl after the mesh stage (so an error later loses nothing) and again
    # after the texture stage, mostly with the same geometry; the user needs the warning once, and a file already
    # warned about skips the check (a merge of the whole mesh).
    stl = path.suffix.lower() == ".stl"
    if stl and (key := str(path.resolve())) not in _STL_WARNED and (message := stl_warning(mesh, path.name)):
        logger.warning(message)
        _STL_WARNED[key] = None
        while len(_STL_WARNED) > 256:  # bounded: a long-running app writes many folders
            del _STL_WARNED[next(iter(_STL_WARNED))]
    path.parent.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = _create_temporary(path.parent, name)
            staged.append((tmp, path.parent / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [final for _, final in staged]


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Read a mesh written by `export_mesh` back as one `trimesh.Trimesh`, vertices and faces in file order, with
    its vertex colours (also from a GLB with a material) or its texture."""
    loaded = trimesh.load(path, process=False)
    geometries = list(loaded.geometry.values()) if isinstance(loaded, trimesh.Scene) else [loaded]
    if len(geometries) != 1:
        raise ValueError(f"{path} holds {len(geometries)} meshes; expected the single mesh export_mesh writes")
    mesh = geometries[0]
    colors = getattr(mesh.visual, "vertex_attributes", {}).get("color")
    if mesh.visual.kind != "vertex" and not is_textured(mesh) and colors is not None:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors)
    return mesh
