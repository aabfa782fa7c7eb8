"""t2mv.view_render: the renderer's gradients against finite differences, its fused cosine node, its renders
against an independent analytic ray-cast, and the mesh topology it works on."""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from view_scenes import CAMERA, SIZE, bumpy_sphere, raycast_targets

from t2mv import view_render as vr
from t2mv.view_texture import ViewCamera
from wonder3d_perflow.cameras import VIEW_NAMES


def test_render_gradients_match_finite_differences(one_thread):
    mesh = bumpy_sphere(1)  # 42 vertices, 80 faces
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=32)
    x = torch.tensor(mesh.vertices, dtype=torch.float64)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    vis = vr.visibility(x, topo, camera, 32)
    base = vr.render(x, topo, camera, vis)
    gen = torch.Generator().manual_seed(0)
    w_normal = torch.randn(len(vis.pixel), 3, generator=gen, dtype=torch.float64)  # (N, 3)
    # Interior of the silhouette ramp only: at 0 or 1 the coverage is clamped (no gradient, a kink).
    ramp = (base.edge_coverage > 0.02) & (base.edge_coverage < 0.98)
    assert ramp.sum() > 20
    w_edge = torch.randn(len(vis.edge_pixel), generator=gen, dtype=torch.float64) * ramp  # (B,)

    def loss(v: torch.Tensor, check_same_visibility: bool = False) -> torch.Tensor:
        vis_v = vr.visibility(v, topo, camera, 32)  # re-rasterised: the function the optimiser really sees
        if check_same_visibility:  # a step of 1e-6 moves no pixel centre across an edge
            assert torch.equal(vis_v.pixel, vis.pixel) and torch.equal(vis_v.face, vis.face)
            assert torch.equal(vis_v.edge_pixel, vis.edge_pixel) and torch.equal(vis_v.edge, vis.edge)
        r = vr.render(v, topo, camera, vis_v)
        return (r.normal * w_normal).sum() + (r.edge_coverage * w_edge).sum()

    xg = x.clone().requires_grad_(True)
    loss(xg).backward()
    # Every coordinate of 8 contour vertices (silhouette and normals) and of 8 others (normals only).
    contour = vis.edge.unique()
    others = torch.tensor([i for i in range(len(x)) if i not in set(contour.tolist())])
    chosen = torch.cat([contour[torch.randperm(len(contour), generator=gen)[:8]], others[:8]])
    eps = 1e-6
    for i in chosen.tolist():
        for j in range(3):
            plus, minus = x.clone(), x.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric = (loss(plus, True) - loss(minus, True)) / (2 * eps)
            torch.testing.assert_close(xg.grad[i, j], numeric, rtol=1e-5, atol=1e-7)
    assert xg.grad[chosen].abs().max() > 1e-3

    # The silhouette term alone reaches the contour vertices (and only through the edges it is computed from).
    xs = x.clone().requires_grad_(True)
    vr.render(xs, topo, camera, vis).edge_coverage.mul(w_edge).sum().backward()
    moved = xs.grad.norm(dim=-1) > 0
    assert moved.any()
    assert set(torch.nonzero(moved).squeeze(1).tolist()) <= set(vis.edge.unique().tolist())


def test_fused_pixel_cosine(one_thread):
    """The optimiser's fused cosine node: finite differences (gradcheck) and the composed ops agree with it."""
    gen = torch.Generator().manual_seed(1)
    pairs, pixels = 7, 40
    coef = torch.randn(pairs, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    pair = torch.randint(0, pairs, (pixels,), generator=gen)
    p = torch.rand(pixels, 2, generator=gen, dtype=torch.float64) * 4
    target = torch.nn.functional.normalize(torch.randn(pixels, 3, generator=gen, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda c: vr._PixelCosine.apply(c, pair, p, target), (coef,))

    mesh = bumpy_sphere(1)
    x = torch.tensor(mesh.vertices, dtype=torch.float64, requires_grad=True)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=32)
    r = vr.render(x, topo, camera, vr.visibility(x, topo, camera, 32))
    target = torch.nn.functional.normalize(
        torch.randn(len(r.vis.pixel), 3, generator=gen, dtype=torch.float64), dim=-1
    )
    fused = r.cosine(target)
    composed = (r.normal * target).sum(-1)
    torch.testing.assert_close(fused, composed)
    (g_fused,) = torch.autograd.grad(fused.sum(), x, retain_graph=True)
    (g_composed,) = torch.autograd.grad(composed.sum(), x)
    torch.testing.assert_close(g_fused, g_composed)


def test_hand_written_backward_nodes(one_thread):
    """The hand-written backward nodes: the barycentric one and the vertex normals against finite differences
    (gradcheck); the interpolated normal reproduces the corner normals at the corners; a degenerate (zero-area)
    triangle gets no position gradient, not inf/nan."""
    gen = torch.Generator().manual_seed(2)
    pairs = 6
    tri_xy = (torch.rand(pairs, 3, 2, generator=gen, dtype=torch.float64) * 8).requires_grad_(True)
    n = torch.randn(pairs, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(vr._PairCoefficients.apply, (tri_xy, n))
    coef = vr._PairCoefficients.apply(tri_xy, n).detach().reshape(pairs, 3, 3)  # rows gx, gy, h
    at_corners = coef[:, None, 0] * tri_xy.detach()[..., :1] + coef[:, None, 1] * tri_xy.detach()[..., 1:]
    torch.testing.assert_close(at_corners + coef[:, None, 2], n.detach())  # m(corner i) = n_i

    mesh = bumpy_sphere(1)
    x = torch.tensor(mesh.vertices, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: vr.vertex_normals(v, torch.tensor(mesh.faces)), (x,))

    flat = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    normals = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    vr._PairCoefficients.apply(flat, normals).sum().backward()
    assert torch.isfinite(normals.grad).all() and torch.equal(flat.grad, torch.zeros_like(flat))


def test_soft_silhouette_matches_the_disc_it_approximates(one_thread):
    """Each silhouette pixel's soft coverage against the analytic one of a sphere's projection (a disc): the area of
    a pixel-wide box cut by the outline. The side of the contour edge that is inside must come from where the
    object is, not from the front face's third vertex: at a contour that face is seen edge-on, and 8 % of the
    pixels of this very sphere had their coverage flipped (c -> 1 - c)."""
    radius = 0.51
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)  # outline within 0.02 px of the disc
    camera = ViewCamera(scale=1.4, center=(0.01, 0.02, -0.01), image_size=256)
    x = torch.tensor(mesh.vertices, dtype=torch.float32)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    vis = vr.visibility(x, topo, camera, 256)
    coverage = vr.render(x, topo, camera, vis).edge_coverage  # (B,)
    centre = camera.project(torch.zeros(1, 3))[:, 0, :2]  # (6, 2) the disc's centre in each view
    pixels_per_unit = float((camera.project(torch.tensor([[1.0, 0.0, 0.0]]))[0, 0, :2] - centre[0]).norm())
    view, local = vis.edge_pixel // 256**2, vis.edge_pixel % 256**2
    p = torch.stack([(local % 256).float() + 0.5, (local // 256).float() + 0.5], dim=-1)  # (B, 2) pixel centres
    inside = radius * pixels_per_unit - (p - centre[view]).norm(dim=-1)  # (B,) signed distance to the outline
    analytic = (0.5 + inside).clamp(0.0, 1.0)
    assert len(coverage) > 3000
    error = (coverage - analytic).abs()
    assert float(error.max()) < 0.1 and float(error.mean()) < 0.02


def test_renderer_matches_analytic_raycast(one_thread):
    """The module's renders of the ground-truth mesh agree with an independent ray-cast of the analytic surface:
    same silhouettes (also no mirror image: the bumps are asymmetric) and normals in the front camera's frame."""
    gt = bumpy_sphere(5)
    normals_rc, masks_rc = raycast_targets(CAMERA)
    x = torch.tensor(gt.vertices, dtype=torch.float32)
    topo = vr.mesh_topology(torch.tensor(gt.faces), len(x))
    vis = vr.visibility(x, topo, CAMERA, SIZE)
    normal, coverage = vr.render(x, topo, CAMERA, vis).images()
    hard = vis.hard.reshape(6, SIZE, SIZE).numpy()
    normal = normal.reshape(6, SIZE, SIZE, 3).numpy()
    for k, name in enumerate(VIEW_NAMES):
        iou = (hard[k] & masks_rc[k]).sum() / (hard[k] | masks_rc[k]).sum()
        assert iou > 0.98, (name, iou)
        soft = coverage[k].reshape(SIZE, SIZE).numpy()
        assert abs(soft.sum() - masks_rc[k].sum()) < 0.01 * masks_rc[k].sum(), name
        both = hard[k] & masks_rc[k]
        cos = (normal[k][both] * normals_rc[k][both]).sum(-1).clip(-1, 1)
        assert np.degrees(np.arccos(cos)).mean() < 2.0, name
    # Mirror check: the left and right halves of the front view differ, and the renders agree on which is which.
    assert not np.array_equal(masks_rc[0], masks_rc[0][:, ::-1])


def test_topology():
    mesh = trimesh.creation.icosphere(subdivisions=2)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(mesh.vertices))
    assert len(topo.edges) == len(mesh.edges_unique)
    assert (topo.edge_faces >= 0).all()  # closed: two faces per edge
    for e, (f0, f1), (o0, o1) in zip(topo.edges.tolist()[:50], topo.edge_faces.tolist(), topo.edge_opposite.tolist()):
        assert set(e) < set(mesh.faces[f0]) and set(e) < set(mesh.faces[f1])
        assert o0 in mesh.faces[f0] and o0 not in e and o1 in mesh.faces[f1] and o1 not in e
