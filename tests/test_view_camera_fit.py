"""t2mv.view_texture.fit_camera on the masks a generator gives: thin parts drawn a pixel or two wider.

A table (a thin top on four thin legs) and its six silhouettes at a known camera; the masks are grown by 2 px, as
the union of a colour view and a normal map whose outlines sit a pixel or two apart makes them. A fit started from
the silhouettes' areas alone lands ~15 % off in scale (the legs' area grows by half) and stays there; the fit must
recover the camera within a few percent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage

from t2mv.view_texture import ViewCamera, _render_views, fit_camera


def table(leg: float = 0.07) -> trimesh.Trimesh:
    top = trimesh.creation.box((1.5, 0.08, 1.0), trimesh.transformations.translation_matrix((0, 0.55, 0)))
    legs = [
        trimesh.creation.box((leg, 1.1, leg), trimesh.transformations.translation_matrix((sx * 0.62, 0.0, sz * 0.38)))
        for sx in (-1, 1)
        for sz in (-1, 1)
    ]
    shelf = trimesh.creation.box((1.24, 0.05, 0.76), trimesh.transformations.translation_matrix((0, -0.3, 0)))
    return trimesh.util.concatenate([top, *legs, shelf])


@pytest.mark.parametrize("grow", [0, 2])
def test_camera_fit_survives_thin_parts_drawn_wider(grow, one_thread):
    """The mesh's legs are thinner than the views' (TripoSR's smoothed field thins them), the masks 2 px wider."""
    mesh = table(leg=0.035)
    truth = ViewCamera(scale=1.0, center=(0.03, 0.05, -0.02), image_size=256)
    drawn = table(leg=0.07)
    vertices = torch.tensor(drawn.vertices, dtype=torch.float32)
    faces = torch.tensor(drawn.faces, dtype=torch.long)
    _, covered = _render_views(vertices, faces, truth)  # (6, S, S)
    masks = covered.numpy()
    if grow:
        masks = np.stack([ndimage.binary_dilation(m, iterations=grow) for m in masks])
    camera, iou, _ = fit_camera(mesh, torch.from_numpy(masks))
    # 2 px on an object ~200 px wide is 1-2 % of its size; a fit that follows the legs' area is ~15 % off.
    assert abs(camera.scale / truth.scale - 1) < 0.03, camera
    assert np.abs(np.subtract(camera.center, truth.center)).max() < 0.02, camera
    assert min(float(x) for x in iou) > 0.4, iou  # the legs stay thinner than drawn: the IoU cannot reach 1


def test_thin_parts_a_pixel_or_two_off_still_texture_and_refine(one_thread):
    """Thin legs drawn 2 px wider than the mesh's are most of their width: the silhouette IoU falls to ~0.6, where
    the stage used to give up (texture: ViewTextureError below 0.6; refinement skipped). The checks now count the
    pixels within 2 px of the other silhouette: every view agrees, nothing is skipped; a view of another shape
    still fails them."""
    from PIL import Image

    from t2mv.view_texture import _agreement, texture_from_views
    from t2mv.views_to_mesh import views_to_mesh

    mesh = table(leg=0.035)
    truth = ViewCamera(scale=1.0, center=(0.03, 0.05, -0.02), image_size=256)
    drawn = table(leg=0.035)
    _, covered = _render_views(torch.tensor(drawn.vertices, dtype=torch.float32), torch.tensor(drawn.faces), truth)
    wide = np.stack([ndimage.binary_dilation(m, iterations=2) for m in covered.numpy()])  # (6, S, S)
    colors = [Image.fromarray(np.where(m[..., None], [150, 90, 40], 255).astype(np.uint8)) for m in wide]
    masks = [Image.fromarray((m * 255).astype(np.uint8)) for m in wide]
    out = texture_from_views(mesh, colors, masks=masks, texture_size=512)
    assert np.mean(out.view_iou) < 0.7, out.view_iou  # what the IoU makes of it
    assert min(out.view_agreement) > 0.9 and not any("poorly" in w for w in out.warnings), out.warnings

    normals = [Image.fromarray(np.where(m[..., None], [128, 128, 255], 255).astype(np.uint8)) for m in wide]
    staged = views_to_mesh(mesh, colors, normals, refine=True, texture_size=512, iterations=0)
    assert not any("Refinement skipped" in w for w in staged.warnings), staged.warnings
    assert staged.refine is not None

    a = torch.from_numpy(wide)
    other = torch.zeros_like(a)
    other[:, 100:140, 20:236] = True  # a bar: the same place, another shape
    assert (_agreement(a, a) == 1).all() and (_agreement(a, other) < 0.5).all()
