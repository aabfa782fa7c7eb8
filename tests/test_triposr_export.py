"""triposr.export: GLB / OBJ / PLY / STL with vertex colours or a baked texture, read back; atomic writes."""

import json
import os
import struct

import numpy as np
import pytest
import torch
import trimesh

from triposr import export, texture


def colored_mesh():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    rgb = np.round(255 * (mesh.vertices + 0.5)).clip(0, 255).astype(np.uint8)
    mesh.visual.vertex_colors = np.concatenate([rgb, np.full_like(rgb[:, :1], 255)], axis=1)
    return mesh


def textured_mesh():
    def field(points):
        return {"color": (0.5 + 0.8 * points).clamp(0, 1)}

    return texture.bake_texture_from_field(field, trimesh.creation.icosphere(subdivisions=2, radius=0.5), 512)


def glb_json(path):
    data = path.read_bytes()
    length = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[20 : 20 + length])


def test_glb_vertex_colors_round_trip_with_matte_material(tmp_path):
    mesh = colored_mesh()
    (path,) = export.export_mesh(mesh, tmp_path / "m.glb")
    back = export.load_mesh(path)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)  # no rotation on export
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(back.visual.vertex_colors, mesh.visual.vertex_colors)
    tree = glb_json(path)
    primitive = tree["meshes"][0]["primitives"][0]
    assert "COLOR_0" in primitive["attributes"]
    pbr = tree["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0]


def test_obj_vertex_colors_use_the_v_xyz_rgb_extension(tmp_path):
    mesh = colored_mesh()
    (path,) = export.export_mesh(mesh, tmp_path / "m.obj")
    v_lines = [line.split() for line in path.read_text().splitlines() if line.startswith("v ")]
    assert len(v_lines) == len(mesh.vertices) and all(len(v) == 7 for v in v_lines)
    rgb = np.array([[float(x) for x in v[4:]] for v in v_lines])
    np.testing.assert_allclose(rgb, mesh.visual.vertex_colors[:, :3] / 255.0, atol=1e-6)
    back = export.load_mesh(path)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors, mesh.visual.vertex_colors)
    assert not list(tmp_path.glob("*.mtl"))


def test_ply_round_trip(tmp_path):
    mesh = colored_mesh()
    (path,) = export.export_mesh(mesh, tmp_path / "m.ply")
    back = export.load_mesh(path)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors, mesh.visual.vertex_colors)


def test_textured_glb_embeds_the_texture(tmp_path):
    mesh = textured_mesh()
    (path,) = export.export_mesh(mesh, tmp_path / "t.glb")
    back = export.load_mesh(path)
    assert back.visual.kind == "texture"
    np.testing.assert_allclose(back.visual.uv, mesh.visual.uv, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(back.visual.material.baseColorTexture.convert("RGB")),
        np.asarray(mesh.visual.material.baseColorTexture),
    )
    tree = glb_json(path)
    assert len(tree["images"]) == 1
    assert tree["materials"][0]["pbrMetallicRoughness"]["metallicFactor"] == 0.0


def test_textured_obj_writes_mtl_and_png(tmp_path):
    mesh = textured_mesh()
    written = export.export_mesh(mesh, tmp_path / "t.obj")
    assert sorted(p.name for p in written) == ["t.mtl", "t.obj", "t.png"]
    mtl = (tmp_path / "t.mtl").read_text()
    assert "map_Kd t.png" in mtl and "Kd 1.0 1.0 1.0" in mtl
    text = (tmp_path / "t.obj").read_text()
    assert "mtllib t.mtl" in text and "\nvt " in text
    back = export.load_mesh(tmp_path / "t.obj")
    assert back.visual.kind == "texture"
    np.testing.assert_array_equal(
        np.asarray(back.visual.material.image.convert("RGB")), np.asarray(mesh.visual.material.baseColorTexture)
    )


def test_textured_ply_gets_colors_from_the_texture(tmp_path):
    (path,) = export.export_mesh(textured_mesh(), tmp_path / "t.ply")
    back = export.load_mesh(path)
    assert back.visual.kind == "vertex"
    rgb = back.visual.vertex_colors[:, :3] / 255.0
    expected = (0.5 + 0.8 * torch.from_numpy(back.vertices[:, [2, 0, 1]])).clamp(0, 1).numpy()  # model frame
    assert np.abs(rgb - expected).max() < 0.05


def test_bad_suffix_and_empty_mesh(tmp_path):
    with pytest.raises(ValueError, match="unsupported mesh format"):
        export.export_mesh(colored_mesh(), tmp_path / "m.fbx")
    with pytest.raises(ValueError, match="empty mesh"):
        export.export_mesh(trimesh.Trimesh(), tmp_path / "m.glb")
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "t.obj"
    target.write_text("old")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        export.export_mesh(textured_mesh(), target)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    monkeypatch.setattr(export.os, "fdopen", lambda *a, **k: (_ for _ in ()).throw(OSError("no space")))
    target.write_text("old")
    with pytest.raises(OSError, match="no space"):
        export.export_mesh(colored_mesh(), target)
    assert target.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_mesh_files_get_the_ordinary_mode_less_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = export.export_mesh(textured_mesh(), tmp_path / "mesh.obj")  # .obj + .mtl + .png
        written += export.export_mesh(colored_mesh(), tmp_path / "mesh.glb")
        written += export.export_mesh(colored_mesh(), tmp_path / "mesh.ply")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in written) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.ply", "mesh.png"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary left


def test_stl_loads_back_in_trimesh_with_the_same_surface(tmp_path, caplog):
    mesh = textured_mesh()  # a texture is dropped: STL is geometry only
    with caplog.at_level("WARNING", logger="triposr.export"):
        (path,) = export.export_mesh(mesh, tmp_path / "mesh.stl")
    assert path.name == "mesh.stl" and not caplog.records  # a closed sphere: no warning
    assert path.stat().st_size == 84 + 50 * len(mesh.faces)  # binary STL: header, count, 50 bytes a triangle
    back = trimesh.load(path)  # merges the per-triangle corners back into shared vertices
    assert len(back.faces) == len(mesh.faces) and back.is_watertight
    np.testing.assert_allclose(back.area, mesh.area, rtol=1e-5)
    np.testing.assert_allclose(back.volume, mesh.volume, rtol=1e-5)  # same winding: outward normals kept
    np.testing.assert_allclose(back.bounds, mesh.bounds, atol=1e-6)  # no rotation or scale of its own


def test_stl_of_an_open_mesh_is_written_with_a_warning(tmp_path, caplog):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    holed = trimesh.Trimesh(sphere.vertices, sphere.faces[1:], process=False)
    assert export.stl_warning(sphere) is None
    with caplog.at_level("WARNING", logger="triposr.export"):
        export.export_mesh(holed, tmp_path / "holed.stl")
    assert "holed.stl is not watertight" in caplog.text
    assert len(trimesh.load(tmp_path / "holed.stl").faces) == len(holed.faces)
    # Written again (the chain rewrites mesh.stl after texturing): warned once per file, not per write.
    caplog.clear()
    with caplog.at_level("WARNING", logger="triposr.export"):
        export.export_mesh(holed, tmp_path / "holed.stl")
        export.export_mesh(holed, tmp_path / "other.stl")
    assert "holed.stl" not in caplog.text and "other.stl is not watertight" in caplog.text
