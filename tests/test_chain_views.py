"""The six views reach the mesh in the chain (smoke mode): views texture, field fallback, files, refinement wiring.

The tiny random models draw noise (the smoke-mode TripoSR mesh is a dozen ragged blobs filling its box), so these
tests give the chain an object it can be checked on: the mesh stage returns an ellipsoid with green "field" vertex
colours, and the multiview stage returns colour views rendered from that ellipsoid (left half red, right half blue,
white background) by the screen rasteriser at a known camera. The texture the chain writes must then come from
those views, not from the field.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from t2mv.chain import TextTo3D
from triposr.export import load_mesh
from triposr.texture import rasterize_screen
from wonder3d_perflow.cameras import VIEW_NAMES

RED, BLUE = np.array([220, 30, 30]), np.array([30, 30, 220])


def object_image(size=96):
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pixels = np.asarray(image).copy()
    pixels[20:80, 28:68] = (200, 120, 40)
    return Image.fromarray(pixels)


def _render(mesh: trimesh.Trimesh, size: int, shade) -> list[Image.Image]:
    """Six orthographic views of `mesh` (export frame) on white: ``shade(points (N, 3), faces (N,))`` → (N, 3) uint8."""
    from t2mv.view_texture import ViewCamera

    vertices = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)  # (V, 3)
    faces = torch.tensor(np.asarray(mesh.faces), dtype=torch.long)  # (F, 3)
    centre = (vertices.amax(0) + vertices.amin(0)) / 2  # (3,)
    radius = float((vertices - centre).norm(dim=-1).max())
    camera = ViewCamera(scale=0.8 / radius, center=tuple(centre.tolist()), image_size=size)
    projected = camera.project(vertices)  # (6, V, 3)
    views = []
    for k in range(len(VIEW_NAMES)):
        pixel, face, bary = rasterize_screen(projected[k, :, :2], projected[k, :, 2], faces, size, size)
        points = (vertices[faces[face]] * bary[..., None]).sum(1)  # (N, 3)
        image = np.full((size * size, 3), 255, dtype=np.uint8)
        image[pixel.numpy()] = shade(points.numpy(), face.numpy())
        views.append(Image.fromarray(image.reshape(size, size, 3)))
    return views


def render_views(mesh: trimesh.Trimesh, size: int) -> list[Image.Image]:
    """Six colour views: surface with x < centre red, else blue."""
    centre = (np.asarray(mesh.vertices).max(0) + np.asarray(mesh.vertices).min(0)) / 2
    return _render(mesh, size, lambda points, face: np.where((points[:, 0] < centre[0])[:, None], RED, BLUE))


def render_normals(mesh: trimesh.Trimesh, size: int) -> list[Image.Image]:
    """Six normal maps as Wonder3D draws them: the surface normal in the export frame, RGB = (n + 1) / 2."""
    normals = np.asarray(mesh.face_normals)  # (F, 3)
    return _render(mesh, size, lambda points, face: np.round((normals[face] + 1) / 2 * 255).astype(np.uint8))


class ViewsStage:
    """A multiview stage that returns fixed views: `colors` and `normals`."""

    def __init__(self, real, colors, normals):
        self.real, self.colors, self.normals = real, colors, normals
        self.unet, self.vae_scale_factor = real.unet, real.vae_scale_factor

    def to(self, *args, **kwargs):
        return self

    def __call__(self, image, **kwargs):
        return SimpleNamespace(normals=self.normals, colors=self.colors, view_names=VIEW_NAMES, timings={})


GREEN = (60, 160, 60, 255)


def ellipsoid() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.apply_scale((0.35, 0.45, 0.3))
    mesh.visual.vertex_colors = np.tile(GREEN, (len(mesh.vertices), 1))  # the "field" colours
    return mesh


@pytest.fixture(scope="module")
def chain_and_field():
    chain = TextTo3D.tiny(seed=0, stages=("multiview", "mesh"))
    chain.reconstructor.extract_mesh = lambda *args, **kwargs: [ellipsoid()]
    field = chain(image=object_image(), texture_source="field", remove_background=False)
    assert field.settings["texture_source"] == "field" and field.field_mesh is None
    size = chain._multiview_size()
    chain.multiview = ViewsStage(chain.multiview, render_views(field.mesh, size), render_normals(field.mesh, size))
    return chain, field


def _left_right(mesh: trimesh.Trimesh, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(mesh.vertices)[:, 0]
    centre, half = (x.max() + x.min()) / 2, (x.max() - x.min()) / 2
    left, right = x < centre - 0.3 * half, x > centre + 0.3 * half
    return colors[left, :3].astype(float).mean(0), colors[right, :3].astype(float).mean(0)


def test_views_texture_the_mesh_and_every_format_carries_it(chain_and_field, tmp_path):
    chain, field = chain_and_field
    result = chain(
        image=object_image(), remove_background=False, output_dir=tmp_path, mesh_formats=("glb", "obj", "ply")
    )
    info = result.info["view_texture"]
    assert result.settings["texture_source"] == "views" and info["texture_source"] == "views"
    assert info["coverage"] > 0.8
    assert min(info["view_iou"].values()) > 0.9 and list(info["view_iou"]) == list(VIEW_NAMES)
    assert "texture" in result.timings and result.field_mesh is not None
    for name in ("mesh.glb", "mesh.obj", "mesh.ply", "mesh_field.glb", "info.json", "settings.json"):
        assert (tmp_path / name).is_file(), name

    # The GLB is UV-textured from the views: left red, right blue (the field's colours are random noise).
    glb = load_mesh(tmp_path / "mesh.glb")
    assert glb.visual.kind == "texture"
    sampled = glb.visual.to_color().vertex_colors  # texture sampled at the vertices
    left, right = _left_right(glb, np.asarray(sampled))
    assert left[0] > left[2] + 80 and right[2] > right[0] + 80, (left, right)
    # The PLY carries the same colours as vertex colours; the OBJ references its texture.
    ply = load_mesh(tmp_path / "mesh.ply")
    left, right = _left_right(ply, np.asarray(ply.visual.vertex_colors))
    assert left[0] > left[2] + 80 and right[2] > right[0] + 80, (left, right)
    assert "map_Kd" in next(tmp_path.glob("*.mtl")).read_text()
    # ... and it is not the field's colouring, which is kept beside it for comparison.
    field_glb = load_mesh(tmp_path / "mesh_field.glb")
    assert (np.asarray(field_glb.visual.vertex_colors) == GREEN).all()
    assert np.allclose(field_glb.vertices, field.mesh.vertices, atol=1e-5)


def test_an_unusable_view_set_keeps_the_field_colours_with_a_warning(chain_and_field, tmp_path):
    chain, _ = chain_and_field
    good = chain.multiview
    white = [Image.new("RGB", good.colors[0].size, (255, 255, 255))] * 6
    chain.multiview = ViewsStage(good.real, white, white)  # no object in either: nothing to align
    try:
        result = chain(image=object_image(), remove_background=False, output_dir=tmp_path, mesh_formats=("glb",))
    finally:
        chain.multiview = good
    assert result.settings["texture_source"] == "field"
    assert any("could not texture the mesh" in w for w in result.warnings)
    assert result.mesh.visual.kind == "vertex" and result.field_mesh is None
    for name in ("mesh.glb", "normals.png", "colors.png", "settings.json"):  # nothing lost
        assert (tmp_path / name).is_file(), name


def test_without_the_multiview_stage_the_field_colours_are_used():
    chain = TextTo3D.tiny(seed=0, stages=("mesh",))
    chain.reconstructor.extract_mesh = lambda *args, **kwargs: [ellipsoid()]
    result = chain(image=object_image(), remove_background=False, refine=True)
    assert result.settings["texture_source"] == "field" and result.settings["refine"] is False
    assert any("multiview stage did not run" in w for w in result.warnings)


def bulged(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The ellipsoid with a bump on its front (+Z): what the views show and the mesh stage's ellipsoid lacks."""
    v = np.asarray(mesh.vertices)
    d = v / np.linalg.norm(v, axis=1, keepdims=True)
    bump = 1.0 + 0.25 * np.exp((d[:, 2] - 1.0) / 0.15)  # (V,) up to 25 % further out along +Z
    return trimesh.Trimesh(v * bump[:, None], mesh.faces, process=False)


def bulged_target() -> trimesh.Trimesh:
    fine = trimesh.creation.icosphere(subdivisions=4)
    fine.apply_scale((0.35, 0.45, 0.3))
    return bulged(fine)


def run_with_views_of(chain, target: trimesh.Trimesh, **settings):
    """The chain with its multiview stage replaced by `target`'s rendered views, one run per `settings` dict."""
    good = chain.multiview
    size = chain._multiview_size()
    chain.multiview = ViewsStage(good.real, render_views(target, size), render_normals(target, size))
    try:
        return [chain(image=object_image(), remove_background=False, **run) for run in settings.values()]
    finally:
        chain.multiview = good


def test_refine_runs_before_texturing_and_is_recorded(chain_and_field, tmp_path):
    """The views show a bump the mesh lacks: the refinement must run (steps taken, loss down, accepted), move the
    surface towards the bump, and the textured mesh must be that refined surface, not the mesh stage's."""
    chain, field = chain_and_field
    target = bulged_target()
    (result,) = run_with_views_of(chain, target, fit={"refine": True, "refine_iterations": 40})
    refine = result.info["refine"]
    assert set(refine) >= {"accepted", "losses", "timings"}
    assert refine["parts_added"] == 0  # a bump the mesh lacks is the fit's to shape, not a part to add
    assert "refine" in result.timings and "texture" in result.timings
    assert result.settings["refine"] is True and result.settings["refine_iterations"] == 40
    assert list(result.timings).index("refine") < list(result.timings).index("texture")
    # Optimisation steps ran and lowered the loss, and the result was accepted.
    assert refine["accepted"] is True, result.warnings
    assert sum(r["iterations"] for r in refine["losses"]["rounds"]) == 40
    assert refine["losses"]["rounds"][-1]["best_iteration"] > 0
    first, last = refine["loss_first_last"]
    assert refine["losses"]["final"]["data"] < 0.8 * refine["losses"]["initial"]["data"] and last < first
    # The refined surface grew towards the bump: its front reaches further out than the mesh stage's ellipsoid.
    start = field.mesh
    refined = result.field_mesh
    front = lambda m: np.asarray(m.vertices)[:, 2].max()  # noqa: E731
    assert front(refined) > front(start) + 0.25 * (front(target) - front(start)), (front(start), front(refined))
    # The textured mesh is the refined surface: every vertex of it is a vertex of the refined mesh.
    textured = np.asarray(result.mesh.vertices)
    gap = cKDTree(np.asarray(refined.vertices)).query(textured)[0]
    assert gap.max() < 1e-5, gap.max()
    assert cKDTree(np.asarray(start.vertices)).query(textured)[0].max() > 0.01


def test_simplify_holds_after_the_refinement(chain_and_field):
    """The refinement remeshes (2 px edges: more faces than --simplify asked for); the accepted result is decimated to
    the asked count before it is textured, and the field-coloured copy is that same shape."""
    chain, _ = chain_and_field
    refine = {"refine": True, "refine_iterations": 10}
    full, simple = run_with_views_of(chain, bulged_target(), full=refine, simple={**refine, "simplify_faces": 300})
    assert full.info["refine"]["accepted"] and simple.info["refine"]["accepted"], simple.warnings
    assert full.info["refine"]["faces"] > 600  # the remeshing's own count, well above the asked 300
    assert 250 <= simple.info["refine"]["faces"] <= 300 and len(simple.mesh.faces) == simple.info["refine"]["faces"]
    assert len(simple.field_mesh.faces) == len(simple.mesh.faces)
    assert simple.info["view_texture"]["texture_source"] == "views"
    assert "refine" in simple.timings
