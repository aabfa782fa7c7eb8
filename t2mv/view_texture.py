"""Texture a mesh from Wonder3D's six generated views: silhouette alignment, visibility, blending.

The mesh (TripoSR's, in the export frame: glTF, +Y up, the input view seen from +Z) and the six views (orthographic,
elevation 0, cameras in `wonder3d_perflow.cameras.view_axes`) live at different scales and offsets. One orthographic
camera (`ViewCamera`: a scale and a 3-D centre) is fitted so that the mesh's six silhouettes match the views'
foreground masks; the mesh itself is never moved. Each surface point (UV texel of an atlas, and each vertex)
then takes a blend of the views that see it: visibility by a depth test against a per-view depth buffer
(`triposr.texture.rasterize_screen`), weights cos^k(normal, view direction) times a falloff near mask edges and
depth discontinuities (where a view's pixels mix background or another surface). Surface no view sees falls back,
smoothly, to `fallback(points)` (TripoSR's colour field) or, without one, to a fill diffused from the seen surface.
The fallback's colours are first mapped onto the views' colour distribution (`fallback_transfer`: mean and
covariance matched where both are known), and the views' residual over it is diffused a short way into the unseen
surface (`_residual_fill`), so there is no seam where the views end.

All tensor work runs on `device` (CPU or CUDA); the masks' cleanup and distance transforms (scipy) and the atlas
(`triposr.texture.projection_atlas` in numpy by default, or xatlas) run on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image
from scipy import ndimage

from triposr.texture import (
    check_texture_size,
    default_padding,
    mesh_atlas,
    rasterize_screen,
    rasterize_uv,
    textured_mesh,
)
from wonder3d_perflow.cameras import VIEW_NAMES, view_axes

NUM_VIEWS = len(VIEW_NAMES)
# A pixel is white background when every channel is within this of 255 AND it connects to the image border
# (white inside the object, e.g. a white shirt, stays foreground).
WHITE_TOLERANCE = 12
# Foreground specks smaller than this fraction of the largest foreground component are noise.
MIN_COMPONENT_FRACTION = 0.01
# A view whose mask has fewer pixels than this is dropped (warning): nothing to fit or project.
MIN_MASK_PIXELS = 16
# Alignment that leaves the mean silhouette agreement (`_agreement`: the share of each silhouette's pixels
# within AGREEMENT_PX of the other's) of the used views below this is a failure (ViewTextureError); below
# POOR_AGREEMENT a view is named in a warning. Not IoU: a generated view's outline sits a pixel or two off the mesh's,
# which on thin parts is most of their width (the benchmark's table, legs ~9 px wide: IoU 0.60-0.67 with every view
# well registered, and a draw of the imperfections at 0.60 skipped its refinement).
AGREEMENT_PX = 2
MIN_MEAN_AGREEMENT = 0.75
POOR_AGREEMENT = 0.9
# A view below this agreement is left out of the texture, when no more than MAX_STRAY_VIEWS are (more: the mesh and
# the views disagree as a whole, and the mean decides). Measured: the benchmark's imperfect views 0.92-0.99, a view
# that kept a backdrop 0.62-0.65.
MIN_VIEW_AGREEMENT = 0.75
MAX_STRAY_VIEWS = 2
COS_POWER = 4  # weight = cos^k(normal, view direction): 1 head-on, 0.25 at 45 degrees
EDGE_FALLOFF_PX = 4.0  # weights ramp up over this many pixels from a mask edge or depth discontinuity
# A neighbour this much nearer/farther (in pixel widths) marks a depth discontinuity: large enough that steep but
# continuous surface (up to ~83 degrees off head-on, where cos^4 is negligible anyway) is not one.
DEPTH_JUMP_PX = 16.0
DEPTH_BIAS_PX = 3.0  # depth-test tolerance, in pixel widths
# Where the views' summed weight reaches this, their colour alone is used; below it the colour blends smoothly
# (smoothstep in the summed weight) into the fallback, which alone colours surface no view sees. One view at
# cos^4 = 0.02 sees the surface ~68 degrees off head-on. Coverage counts surface with at least half of this.
FULL_VIEW_WEIGHT = 0.02
# With a (colour-matched) fallback the views' colour takes over only at this summed weight (one view at cos^4 = 0.1:
# ~56 degrees off head-on): seen at a grazing angle, a view's pixels are stretched and land off the surface they
# show (registration, a mesh that is not the object), and the matched field is truer there. Measured on
# benchmarks.view_quality (session 22): +1.1 dB surface colour PSNR on the robot, +0.3 dB on the gear, over 0.02.
MATCHED_VIEW_WEIGHT = 0.1
# With atlas="xatlas": its chart cost limit. 2.0 (xatlas' default) is ~5x slower on 100k faces for a few fewer
# charts; even so xatlas takes tens of seconds there on a CPU, hence the projection atlas by default.
ATLAS_MAX_COST = 0.2
# Colour harmonisation: the prior towards gain 1 / bias 0, per view, relative to the mean weight the view pairs put
# on the data; the points sampled for it; and bounds on the correction (a generator's drift is well inside them).
HARMONIZE_PRIOR = 0.05
HARMONIZE_POINTS = 20000
# With a fallback: each view's mean colour is also pulled towards the colour-matched fallback's over the surface it
# sees (the only pull on surface one view alone sees), at this weight relative to the view's own weight there (view
# pairs weigh min(w_j, w_k)). Measured (session 22): gear +0.3 dB surface colour PSNR, robot/table/mug within 0.05.
HARMONIZE_ANCHOR = 0.05
# The same anchor for the chroma of the views' gains (`_anchor_chroma`), relative to the view's weight. Measured
# (session 30, imperfect views): texture PSNR gear +0.04 dB, robot +0.04, mug and table within 0.01, clean views
# unchanged; the gear's back lost its green cast (gains and brightness against it at 0.05-0.2: no better).
HARMONIZE_GAIN_ANCHOR = 0.05
MAX_GAIN_CHANGE = 0.5
MAX_BIAS_CHANGE = 0.3
# Per-view corrections' bounds: a generator draws a view up to a few percent larger and a pixel or two off.
MAX_VIEW_ZOOM = 0.04  # |zoom - 1|
MAX_VIEW_SHIFT = 0.025  # NDC (3.2 px at 256²)
FIT_RESOLUTION = 128  # the silhouette fit renders and compares silhouettes on at most this grid
FILL_ITERATIONS = 300  # Jacobi sweeps of the no-fallback fill (over the unseen vertices' edges only)
CHUNK = 2**18  # points per blending chunk (bounds memory: 6 views x chunk x a few channels)
# Fallback colour transfer (`fallback_transfer`): the field's colours are mapped onto the views' colour distribution
# where both are known. The map's eigenvalues stay within [1 / TRANSFER_MAX_GAIN, TRANSFER_MAX_GAIN] (a field 0.45 as
# saturated as the views needs ~2.2); covariances get TRANSFER_EPS (colour units², ~1/255 squared) so that a flat
# field maps onto the views' mean; below TRANSFER_MIN_POINTS well-seen sample points the map is the identity.
TRANSFER_MAX_GAIN = 3.0
TRANSFER_EPS = 0.004**2
TRANSFER_MIN_POINTS = 64
# The views' residual over the corrected field (view colour - corrected field), diffused from the seen surface into
# the unseen, fades over this fraction of the mesh's bounding-box diagonal: no seam where the views end, while far
# unseen surface keeps the corrected field.
RESIDUAL_DECAY = 0.03
RESIDUAL_SMOOTH = 30  # Jacobi sweeps smoothing the residual over the seen vertices first (a low-pass)
RESIDUAL_ITERATIONS = 100  # Jacobi sweeps diffusing it (the band it fills is ~3 RESIDUAL_DECAY wide)
RESIDUAL_KNOWN_ALPHA = 0.99  # the residual is taken where the views' colour is (nearly) alone


class ViewTextureError(ValueError):
    """The views could not be aligned with the mesh (or none is usable): the caller should keep the field colours."""


@dataclass(frozen=True)
class ViewCamera:
    """The fitted orthographic camera shared by the six views.

    A 3-D centre rather than a per-view 2-D offset: with elevation-0 cameras rotating about +Y, one 3-D offset is
    the physically consistent parametrisation (vertical offset shared by all views, horizontal offset of view k =
    right_k . centre), and it leaves 4 unknowns for 6 silhouettes instead of 12. On top of it, each view may carry
    a small bounded correction (zoom, 2-D shift; `fit_camera(view_corrections=True)`): a generator draws each view
    a pixel or two off and a percent larger or smaller, which no shared camera can match. `project` applies them, so
    whatever projects through the camera (texturing, the refiner's renderer) sees the corrected views.
    """

    scale: float  # NDC units per export-frame unit
    center: tuple[float, float, float]  # export-frame point that maps to the image centre in every view
    image_size: int = 256
    # Per-view corrections on top of the shared camera (empty: none): view k's NDC is zoom_k * (shared NDC) + shift_k.
    view_zoom: tuple[float, ...] = ()
    view_shift: tuple[tuple[float, float], ...] = ()  # (du, dv) in NDC (u right, v up)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Project export-frame points into the six views (`VIEW_NAMES` order). Differentiable in `points`.

        Args:
            points: (N, 3) export-frame points.

        Returns:
            (6, N, 3): column and row in pixels (continuous, pixel (r, c) has its centre at (c + 0.5, r + 0.5)) and
            depth (the camera-backward coordinate in export units; larger = closer to the camera). NDC
            u = zoom_k * scale * (axes @ (p - center)).x + du_k, v = zoom_k * scale * (...).y + dv_k with u, v in
            [-1, 1] spanning the image; column = (u + 1) / 2 * S, row = (1 - v) / 2 * S.
        """
        axes = view_axes(points.dtype, points.device)  # (6, 3, 3)
        center = torch.tensor(self.center, dtype=points.dtype, device=points.device)  # (3,)
        cam = torch.einsum("kij,nj->kni", axes, points - center)  # (6, N, 3)
        zoom = torch.tensor(self.view_zoom or (1.0,) * 6, dtype=points.dtype, device=points.device)  # (6,)
        shift = torch.tensor(self.view_shift or ((0.0, 0.0),) * 6, dtype=points.dtype, device=points.device)  # (6, 2)
        half = self.image_size / 2.0
        u = (self.scale * zoom)[:, None] * cam[..., 0] + shift[:, 0, None]  # (6, N)
        v = (self.scale * zoom)[:, None] * cam[..., 1] + shift[:, 1, None]  # (6, N)
        return torch.stack([(u + 1.0) * half, (1.0 - v) * half, cam[..., 2]], dim=-1)  # (6, N, 3)

    @property
    def pixel_size(self) -> float:
        """One pixel's width in export-frame units."""
        return 2.0 / (self.image_size * self.scale)


@dataclass
class ViewTexture:
    """Result of `texture_from_views`.

    mesh: UV-textured trimesh (same surface; vertices split along UV seams). vertex_colors: (V, 3) uint8 for the
    input mesh's vertices. coverage: fraction of the surface area whose colour comes mostly from the views.
    view_iou: silhouette IoU per view (0.0 for a dropped view); view_agreement: the same pixels' agreement within
    AGREEMENT_PX (`_agreement`, what the stage's checks use). view_share: fraction of the surface area where each
    view has the largest weight (sums to coverage). used_views: which views took part. color_gain, color_bias: the
    per-view, per-channel colour correction applied before blending (`harmonize_views`). fallback_transfer: the
    (3, 4) colour map [M | b] applied to the fallback (`fallback_transfer`; the identity without a fallback or with
    match_fallback=False). warnings, timings (s).
    """

    mesh: trimesh.Trimesh
    vertex_colors: np.ndarray
    coverage: float
    view_iou: tuple[float, ...]
    camera: ViewCamera
    view_share: tuple[float, ...] = ()
    used_views: tuple[bool, ...] = ()
    color_gain: tuple[tuple[float, float, float], ...] = ()
    color_bias: tuple[tuple[float, float, float], ...] = ()
    fallback_transfer: tuple[tuple[float, float, float, float], ...] = ()
    view_agreement: tuple[float, ...] = ()
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- view inputs


def _check_views(colors: Sequence[Image.Image], masks: Sequence[Image.Image] | None) -> int:
    """Validate the view set; return the common image size."""
    if isinstance(colors, Image.Image) or not isinstance(colors, Sequence):
        raise ValueError(f"colors must be a list of {NUM_VIEWS} PIL images ({', '.join(VIEW_NAMES)})")
    if len(colors) != NUM_VIEWS:
        raise ValueError(f"expected {NUM_VIEWS} view images ({', '.join(VIEW_NAMES)}), got {len(colors)}")
    if not all(isinstance(c, Image.Image) for c in colors):
        raise ValueError("every view must be a PIL image")
    size = colors[0].size
    if size[0] != size[1] or any(c.size != size for c in colors):
        raise ValueError(
            f"the views must be square and of one size (Wonder3D's are 256²), got {[c.size for c in colors]}"
        )
    if masks is not None:
        if len(masks) != NUM_VIEWS or not all(isinstance(m, Image.Image) for m in masks):
            raise ValueError(f"masks must be {NUM_VIEWS} PIL 'L' images, one per view")
        if any(m.size != size for m in masks):
            raise ValueError(f"masks must match the views' size {size}, got {[m.size for m in masks]}")
    return size[0]


def _clean_mask(foreground: np.ndarray) -> np.ndarray:
    """Drop foreground specks (components below MIN_COMPONENT_FRACTION of the largest one)."""
    labels, count = ndimage.label(foreground)
    if count <= 1:
        return foreground
    areas = np.bincount(labels.ravel())[1:]  # (count,)
    keep = np.concatenate([[False], areas >= MIN_COMPONENT_FRACTION * areas.max()])
    return keep[labels]


# A mask covering more of the image's border ring than this is a backdrop, not an object framed by the view
# (measured: noise views 1.0, a ramp kept in both maps ~0.5; the benchmark's objects framed as Wonder3D frames
# them 0, zoomed 1.3x so that the picture cuts them off 0.0-0.29).
BACKDROP_RING = 0.45
# A view's border ring this uniform (share of its pixels within WHITE_TOLERANCE of their median) is its background.
BORDER_UNIFORM = 0.9


def _ring(image: np.ndarray) -> np.ndarray:
    """The image's border ring, each pixel once: (4 S - 4, ...) from an (S, S, ...) array."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def _backdrop(rgb: np.ndarray) -> np.ndarray | None:
    """The view's background colour (3,) when it is not white: the median of the image's border ring, where that
    ring is uniform (a generator's grey backdrop, a photo's kept background); None for white (or no uniform ring:
    the object reaches the border, and white is assumed as before)."""
    ring = _ring(rgb).astype(np.int16)  # (4 S - 4, 3)
    colour = np.median(ring, axis=0)  # (3,)
    if (colour >= 255 - WHITE_TOLERANCE).all():
        return None
    if (np.abs(ring - colour) <= WHITE_TOLERANCE).all(axis=-1).mean() < BORDER_UNIFORM:
        return None
    return colour


def _ring_share(mask: np.ndarray) -> float:
    """The share of the image's border ring that a (S, S) mask covers: ~1 for a backdrop taken for the object."""
    return float(_ring(mask).mean())


def backdrop_views(masks: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Which of the (6, S, S) masks are a backdrop rather than a silhouette (6,) bool, and each one's share of the
    picture's border ring: a view that kept its background (a smoke run's noise, a photo's room in both maps) has
    no outline to fit, carve or refine against, and its colours would paint the backdrop."""
    shares = [_ring_share(m) for m in masks.bool().cpu().numpy()]
    return torch.tensor([x > BACKDROP_RING for x in shares], device=masks.device), shares


def _background(rgb: np.ndarray) -> np.ndarray:
    """(S, S) bool: the colour view's background-coloured pixels (near-white, or near its uniform backdrop)."""
    rgb = rgb.astype(np.int16)  # (S, S, 3)
    colour = _backdrop(rgb)
    if colour is None:
        return (rgb >= 255 - WHITE_TOLERANCE).all(axis=-1)
    return (np.abs(rgb - colour) <= WHITE_TOLERANCE).all(axis=-1)


def view_masks(colors: Sequence[Image.Image], masks: Sequence[Image.Image] | None = None) -> list[torch.Tensor]:
    """Foreground masks of the six views.

    Args:
        colors: 6 PIL images in `VIEW_NAMES` order, square, one size, white background.
        masks: optional 6 PIL "L" images (>= 128 = object); used as given (other modes are converted to "L").

    Returns:
        6 (S, S) bool CPU tensors. Without masks: background = near-white pixels connected to the image border
        (enclosed white stays object), then foreground specks are removed. An all-white view gives an empty mask.

    Raises:
        ValueError: wrong count, non-PIL items, non-square or mismatched sizes.
    """
    _check_views(colors, masks)
    out = []
    for k in range(NUM_VIEWS):
        if masks is not None:
            fg = np.asarray(masks[k].convert("L")) >= 128  # (S, S)
        else:
            white = _background(np.asarray(colors[k].convert("RGB")))  # (S, S)
            labels, _ = ndimage.label(white)
            border = np.unique(_ring(labels))
            background = np.isin(labels, border[border > 0])
            fg = _clean_mask(~background)
        out.append(torch.from_numpy(np.ascontiguousarray(fg)))
    return out


# A normal-map pixel is surface when it is at least this far (RGB in [0, 1], Euclidean) from white: a unit normal's
# encoding (n + 1) / 2 is never closer to white than 0.37 (n = (1, 1, 1) / sqrt 3), so white is always background,
# and a rim pixel blurred halfway with the background still counts as surface.
NORMAL_WHITE_DISTANCE = 0.18
# The normal maps' and the colour views' silhouettes may disagree by this many pixels (misregistration, blur).
MASK_RIM_PX = 2
# Enclosed background in the normal maps' silhouette smaller than this fraction of the image is noise, filled;
# a larger one is a real hole (a handle) unless the colour view shows object there.
MAX_NOISE_HOLE_FRACTION = 0.0015


@dataclass(frozen=True)
class ViewMasks:
    """The six views' masks (`object_masks`), each (6, S, S) bool.

    object: the object's silhouette in the normal maps (with the colour views' help, holes filled): the refinement's
    silhouette target and what its camera is fitted to. color: the colour views' own silhouettes (a pixel or two off
    the normal maps' at worst; white regions of the object kept): what the texture's camera is fitted to and where
    it samples.
    """

    object: torch.Tensor
    color: torch.Tensor


def check_views(colors: Sequence[Image.Image], normals: Sequence[Image.Image] | None = None) -> int:
    """Validate six colour views (and six normal maps when given); return the common image size."""
    size = _check_views(colors, None)
    if normals is not None:
        if isinstance(normals, Image.Image) or not isinstance(normals, Sequence) or len(normals) != NUM_VIEWS:
            raise ValueError(f"normals must be a list of {NUM_VIEWS} PIL images ({', '.join(VIEW_NAMES)})")
        if not all(isinstance(n, Image.Image) for n in normals):
            raise ValueError("every normal map must be a PIL image")
        if any(n.size != (size, size) for n in normals):
            raise ValueError(
                f"the normal maps must match the colour views' size {size}², got {[n.size for n in normals]}"
            )
    return size


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius  # (2r+1, 2r+1)


def _normal_foreground(normal: Image.Image) -> np.ndarray:
    rgb8 = np.asarray(normal.convert("RGB"))  # (S, S, 3)
    if _backdrop(rgb8) is not None:  # a grey backdrop can lie within NORMAL_WHITE_DISTANCE of white, or beyond it
        return ~_background(rgb8)
    rgb = rgb8.astype(np.float32) / 255.0  # (S, S, 3)
    return np.linalg.norm(1.0 - rgb, axis=-1) >= NORMAL_WHITE_DISTANCE  # (S, S)


def _fill_holes(fg: np.ndarray, colored: np.ndarray) -> np.ndarray:
    """Fill enclosed background of `fg` that is small (noise) or that the colour view mostly colours (not white)."""
    labels, count = ndimage.label(~fg)
    if count == 0:
        return fg
    border = np.unique(_ring(labels))
    areas = np.bincount(labels.ravel(), minlength=count + 1)  # (count + 1,)
    object_votes = np.bincount(labels.ravel(), weights=colored.ravel(), minlength=count + 1)
    fill = (areas <= MAX_NOISE_HOLE_FRACTION * fg.size) | (object_votes > 0.5 * areas)
    fill[0] = False
    fill[border] = False
    return fg | fill[labels]


def object_masks(colors: Sequence[Image.Image], normals: Sequence[Image.Image] | None = None) -> ViewMasks:
    """The six views' masks from the normal maps and the colour views together.

    The object is where either shows surface: the normal maps' background is pure white, which no unit normal
    encodes, so a white object (a white shirt, a white mug) keeps its mask where a colour view's white background
    test would bite into it; a real hole (between a table's legs, a mug's handle) is white in both and stays open,
    where the colour view's enclosed-white rule would close it; a thin part one map loses the other keeps. Enclosed
    holes are filled when small (noise) or when the colour view is not white there. Without normal maps the colour
    view's mask (`view_masks`) is used.

    Args:
        colors: 6 PIL RGB images, white background. normals: 6 PIL normal maps (same size) or None.

    Returns:
        `ViewMasks` (object, color), CPU bool tensors (6, S, S).
    """
    check_views(colors, normals)
    if normals is None:
        stack = torch.stack(view_masks(colors))
        return ViewMasks(object=stack, color=stack.clone())
    rim = _disk(MASK_RIM_PX)
    objects, color_masks = [], []
    for k in range(NUM_VIEWS):
        colored = ~_background(np.asarray(colors[k].convert("RGB")))  # (S, S) not background
        fg = _normal_foreground(normals[k])
        if _ring_share(colored) > BACKDROP_RING and _ring_share(fg) <= BACKDROP_RING and fg.any():
            # The colour view kept a backdrop the test cannot tell from the object (a gradient, a photo's room):
            # only what lies near the normal map's silhouette is the object's.
            colored &= fg
        # Either map showing surface counts: a normal map may lose a thin part (a table leg) that the colour view
        # shows, a colour view loses white object to the background test.
        fg = _fill_holes(_clean_mask(fg | colored), colored)  # (S, S)
        # The colour view's own silhouette: near the object's outline (within the rim: the two maps may sit a pixel
        # or two apart) only its coloured pixels count, white there is background; well inside the outline a white
        # region is the object's colour.
        color = (colored & ndimage.binary_dilation(fg, rim)) | ndimage.binary_erosion(fg, rim)
        objects.append(fg)
        color_masks.append(color)
    return ViewMasks(object=torch.from_numpy(np.stack(objects)), color=torch.from_numpy(np.stack(color_masks)))


def _view_colors(colors: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    arrays = [np.asarray(c.convert("RGB"), dtype=np.float32) / 255.0 for c in colors]  # 6 x (S, S, 3)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)  # (6, 3, S, S)


# --------------------------------------------------------------------------------------------- geometry helpers


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-weighted unit vertex normals (V, 3) and face areas (F,)."""
    tri = vertices[faces]  # (F, 3, 3)
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3) 2 x area x normal
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=-1), cross.norm(dim=-1) / 2  # (V, 3), (F,)


def _render_views(
    vertices: torch.Tensor, faces: torch.Tensor, camera: ViewCamera
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth buffers of the six views: (6, S, S) depth (-inf where no surface) and (6, S, S) bool coverage.

    Only faces turned towards each camera are drawn (back faces of a closed mesh are always hidden behind front
    faces, and a silhouette is the union of front faces), which halves the work.
    """
    size = camera.image_size
    proj = camera.project(vertices)  # (6, V, 3)
    axes = view_axes(vertices.dtype, vertices.device)  # (6, 3, 3)
    tri = vertices[faces]  # (F, 3, 3)
    face_normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3) unnormalised
    facing = (face_normal @ axes[:, 2].T).T > 0  # (6, F)
    zbuf = torch.full((NUM_VIEWS, size * size), float("-inf"), dtype=vertices.dtype, device=vertices.device)
    for k in range(NUM_VIEWS):
        view_faces = faces[facing[k]]  # (F_k, 3)
        pixel, face, bary = rasterize_screen(proj[k, :, :2], proj[k, :, 2], view_faces, size, size)
        zbuf[k, pixel] = (proj[k, :, 2][view_faces[face]] * bary).sum(dim=-1).to(zbuf.dtype)  # (N,) depth
    zbuf = zbuf.reshape(NUM_VIEWS, size, size)
    return zbuf, torch.isfinite(zbuf)


def _agreement(a: torch.Tensor, b: torch.Tensor, px: int = AGREEMENT_PX) -> torch.Tensor:
    """(6,) how well two (6, S, S) bool silhouette stacks agree up to `px` pixels: the mean of the share of a's pixels
    within px of b and of b's within px of a (1.0 where both are empty, 0.0 where one is)."""
    width = 2 * px + 1

    def near(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m[:, None].float(), width, stride=1, padding=px)[:, 0] > 0

    na, nb = a.flatten(1).sum(-1).double(), b.flatten(1).sum(-1).double()
    a_in = (a & near(b)).flatten(1).sum(-1).double() / na.clamp(min=1)
    b_in = (b & near(a)).flatten(1).sum(-1).double() / nb.clamp(min=1)
    both = (na > 0) & (nb > 0)
    return torch.where(both, (a_in + b_in) / 2, torch.where((na == 0) & (nb == 0), 1.0, 0.0).double())


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(6,) IoU of two (6, S, S) bool stacks (1.0 where both are empty)."""
    inter = (a & b).flatten(1).sum(-1).double()
    union = (a | b).flatten(1).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# --------------------------------------------------------------------------------------------- alignment


def _moments(sil: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area (pixels) and centroid in NDC (u right, v up) of (6, S, S) silhouettes."""
    size = sil.shape[-1]
    w = sil.double()
    centres = (torch.arange(size, dtype=torch.float64, device=sil.device) + 0.5) / size * 2.0 - 1.0  # (S,)
    area = w.flatten(1).sum(-1)  # (6,)
    u = (w.sum(1) * centres).sum(-1) / area.clamp(min=1)  # (6,) columns
    v = -(w.sum(2) * centres).sum(-1) / area.clamp(min=1)  # (6,) rows, flipped: v up
    return area, u, v


def _extents(sil: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half width, half height and bounding-box centre (u right, v up), all in NDC, of (6, S, S) silhouettes
    (0 for an empty one)."""
    size = sil.shape[-1]
    idx = torch.arange(size, device=sil.device)
    out = []
    for occupied in (sil.any(1), sil.any(2)):  # (6, S) columns, rows
        first = torch.where(occupied, idx, size).amin(-1).double()  # (6,)
        last = torch.where(occupied, idx, -1).amax(-1).double() + 1.0
        out.append(((last - first).clamp(min=0) / size, (first + last) / size - 1.0))  # half extent, centre
    (half_w, cu), (half_h, cv) = out
    return half_w, half_h, cu, -cv  # rows grow downwards, v up


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) separable Gaussian blur."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    images = F.conv2d(images, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(images, k.view(1, 1, -1, 1), padding=(radius, 0))


@dataclass
class _SoftSilhouettes:
    """The soft-IoU objective of the silhouette fit: blurred reference silhouettes of the mesh, rendered once at a
    reference camera (scale s0, centre c0) on an R² grid, resampled at candidate per-view cameras.

    A candidate view k is q_k = (log S_k, A_k, B_k): mask pixel (u, v) (NDC) shows the camera-plane point
    x = (u + A_k) / S_k, y = (v + B_k) / S_k (x = right_k . p, y = p_y for a mesh point p).
    """

    sil: torch.Tensor  # (6, 1, R, R) float reference silhouettes
    target: torch.Tensor  # (6, R*R) masks area-averaged to the grid
    weight: torch.Tensor  # (6,) 1 / number of used views where used, else 0
    right: torch.Tensor  # (6, 3) float32 image-right axes
    c0: torch.Tensor  # (3,) float32
    s0: float

    def images(self, sigma: float) -> torch.Tensor:
        """(6, 3, R, R): blurred silhouettes and their derivatives in u0 and v0 (grid units)."""
        size = self.sil.shape[-1]
        blurred = _gaussian_blur(self.sil, sigma)  # (6, 1, R, R)
        d_col = torch.gradient(blurred, dim=-1)[0] * (size / 2)
        d_row = torch.gradient(blurred, dim=-2)[0] * (size / 2)
        return torch.cat([blurred, d_col, -d_row], dim=1)

    def iou_and_grad(self, q: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft IoU per view (6,) and its gradient in q (6, 3); analytic: one forward resampling of the blurred
        silhouettes and their image gradients (autograd through grid_sample costs ~5x more)."""
        size = self.sil.shape[-1]
        ndc = (torch.arange(size, dtype=torch.float32, device=q.device) + 0.5) / size * 2.0 - 1.0  # (R,)
        scale = q[:, 0].exp()[:, None, None]  # (6, 1, 1)
        xu = ndc[None, None, :] + q[:, 1, None, None]  # (6, 1, R) = S x
        yv = -ndc[None, :, None] + q[:, 2, None, None]  # (6, R, 1) = S y
        xu, yv = xu.expand(-1, size, -1), yv.expand(-1, -1, size)  # (6, R, R) each
        # In the reference render that point sits at u0 = s0 (x - right_k . c0), v0 = s0 (y - c0_y).
        u0 = self.s0 * (xu / scale - (self.right @ self.c0)[:, None, None])
        v0 = self.s0 * (yv / scale - self.c0[1])
        sampled = F.grid_sample(images, torch.stack([u0, -v0], dim=-1), align_corners=False)  # (6, 3, R, R)
        a, da_du, da_dv = sampled.flatten(2).unbind(1)  # (6, R*R) each: value, d/du0, d/dv0
        target = self.target
        inter = (a * target).sum(-1)  # (6,)
        union = (a.sum(-1) + target.sum(-1) - inter).clamp(min=1e-6)
        d_iou = (target * union[:, None] - inter[:, None] * (1 - target)) / (union * union)[:, None]  # (6, R*R)
        g_u, g_v = d_iou * da_du, d_iou * da_dv  # d IoU_k / d u0, d v0 per pixel
        k = self.s0 / scale[:, 0, 0]  # (6,)
        grad = torch.stack(
            [
                -k * ((g_u * xu.flatten(1)).sum(-1) + (g_v * yv.flatten(1)).sum(-1)),  # d/d log S_k
                k * g_u.sum(-1),  # d/d A_k
                k * g_v.sum(-1),  # d/d B_k
            ],
            dim=-1,
        )  # (6, 3)
        return inter / union, grad


def _adam_ascent(
    params: torch.Tensor,
    objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    soft: _SoftSilhouettes,
    schedule: tuple[tuple[float, int, float], ...],
    project: Callable[[torch.Tensor], torch.Tensor] = lambda p: p,
) -> torch.Tensor:
    """Gradient ascent with Adam (written out: torch.optim's first import costs seconds), one blur level after
    another (sigma, steps, lr); each level starts from the best point of the one before. `project` keeps the
    parameters in their bounds after each step. The objective's value is a scalar, or one per row of `params` for
    separable problems (then each row keeps its own best point)."""
    for sigma, steps, lr in schedule:
        images = soft.images(sigma)
        m1, m2 = torch.zeros_like(params), torch.zeros_like(params)
        best_value, best = None, params.clone()
        for step in range(1, steps + 1):
            value, grad = objective(params, images)
            better = torch.ones_like(value, dtype=torch.bool) if best_value is None else value > best_value
            best_value = value if best_value is None else torch.where(better, value, best_value)
            best = torch.where(better.reshape(better.shape + (1,) * (params.ndim - better.ndim)), params, best)
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad * grad
            params = project(params + lr * (m1 / (1 - 0.9**step)) / ((m2 / (1 - 0.999**step)).sqrt() + 1e-8))
        params = best
    return params


def _centre(
    x_mesh: torch.Tensor,
    y_mesh: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    right: torch.Tensor,
    ok: torch.Tensor,
) -> torch.Tensor:
    """The 3-D centre (3,) that puts the mesh's camera-plane points (x_mesh, y_mesh: (6,) export units) at the masks'
    (u, v: (6,) NDC) at this scale, least squares over the usable views."""
    rhs = x_mesh[ok] - u[ok] / scale  # (K,) = right_k . c
    # A (K, 2) least-squares problem, solved on the host: its min-norm answer when only parallel views (front and
    # back) are usable needs the SVD-based driver, which CUDA's lstsq lacks.
    design = right[ok][:, [0, 2]].cpu()  # (K, 2)
    cxz = torch.linalg.lstsq(design, rhs[:, None].cpu(), driver="gelsd").solution[:, 0].to(x_mesh.device)  # (2,)
    cy = (y_mesh[ok] - v[ok] / scale).mean()
    return torch.stack([cxz[0], cy, cxz[1]])  # (3,)


def _fit(
    vertices: torch.Tensor, faces: torch.Tensor, masks: torch.Tensor, used: torch.Tensor, view_corrections: bool
) -> tuple[ViewCamera, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit scale + centre (+ per-view corrections); returns the camera, per-view IoU and agreement within
    AGREEMENT_PX (`_agreement`) (6,) each (0 for an unused view), and the final depth buffers and coverage."""
    size = masks.shape[-1]
    device = vertices.device
    axes = view_axes(torch.float64, device)  # (6, 3, 3)
    right = axes[:, 0]  # (6, 3)

    # 1. A reference render that surely contains the mesh: centre = bounding-box centre, scale from the radius.
    lo, hi = vertices.amin(0).double(), vertices.amax(0).double()
    c0 = (lo + hi) / 2
    radius = (vertices.double() - c0).norm(dim=-1).max().clamp(min=1e-12)
    fit_size = min(size, FIT_RESOLUTION)
    ref = ViewCamera(scale=float(0.98 / radius), center=tuple(c0.tolist()), image_size=fit_size)
    _, ref_sil = _render_views(vertices, faces, ref)  # (6, R, R)

    # 2. Moments: the silhouettes' areas give the scale, their centroids the centre (least squares over the views).
    #    Mask (NDC) = s * (mesh camera-plane coordinates - offset): u_k = s (x_k - right_k . c), v_k = s (y_k - c_y).
    ref_area, ref_u, ref_v = _moments(ref_sil)
    area, u, v = _moments(masks)
    ok = used & (ref_area > 0)
    if not ok.any():
        raise ViewTextureError("the mesh has no silhouette in any usable view")
    x_mesh = ref_u / ref.scale + right @ c0  # (6,) export-unit camera-plane centroids
    y_mesh = ref_v / ref.scale + c0[1]
    # Areas in NDC units (the reference grid is R², the masks S²).
    scale = ref.scale * torch.sqrt((area[ok].sum() / size**2) / (ref_area[ok].sum() / fit_size**2)).item()
    starts = [(scale, _centre(x_mesh, y_mesh, u, v, scale, right, ok))]
    # Second start: the bounding boxes. Areas are swayed by thin parts (a table's legs drawn 2 px wider by a
    # generator are 50 % more area: measured 15 % off in scale, IoU 0.3 after the ascent); extents move by the
    # pixels only.
    ref_w, ref_h, ref_bu, ref_bv = _extents(ref_sil)
    half_w, half_h, bu, bv = _extents(masks)
    ratios = torch.cat([half_w[ok] / ref_w[ok].clamp(min=1e-9), half_h[ok] / ref_h[ok].clamp(min=1e-9)])
    box_scale = ref.scale * float(ratios.median())
    box_x = ref_bu / ref.scale + right @ c0  # (6,)
    box_y = ref_bv / ref.scale + c0[1]
    starts.append((box_scale, _centre(box_x, box_y, bu, bv, box_scale, right, ok)))

    # 3. Maximise the soft IoU of the (blurred) reference silhouettes, resampled at the candidate camera, with the
    #    masks, on the reference grid (masks area-averaged to it: soft targets). Shared parameters p: log scale and
    #    the centre in NDC-sized units (p_c = s c), so that one step moves the silhouettes by similar amounts.
    soft = _SoftSilhouettes(
        sil=ref_sil.to(torch.float32)[:, None],
        target=F.adaptive_avg_pool2d(masks.to(torch.float32)[:, None], fit_size)[:, 0].flatten(1),
        weight=ok.to(torch.float32) / ok.sum(),
        right=right.float(),
        c0=c0.float(),
        s0=ref.scale,
    )
    right32 = right.float()

    def shared(p: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.stack([p[0].expand(NUM_VIEWS), right32 @ p[1:], p[2].expand(NUM_VIEWS)], dim=-1)  # (6, 3)
        iou, g = soft.iou_and_grad(q, images)
        g = g * soft.weight[:, None]  # (6, 3)
        grad = torch.cat([g[:, 0].sum()[None], (right32 * g[:, 1:2]).sum(0)])  # (4,)
        grad[2] += g[:, 2].sum()  # p_y through B_k (right_k has no y)
        return (iou * soft.weight).sum(), grad

    best_value, params = -float("inf"), None
    final = soft.images(0.7)
    for scale, center in starts:
        p = torch.tensor([np.log(scale), *(center * scale).tolist()], dtype=torch.float32, device=device)  # (4,)
        p = _adam_ascent(p, shared, soft, ((2.0, 25, 0.01), (0.7, 15, 0.003)))
        value = float(shared(p, final)[0])
        if value > best_value:
            best_value, params = value, p
    scale = float(params[0].exp())
    center = params[1:].double() / scale  # (3,)
    camera = ViewCamera(scale=float(scale), center=tuple(float(x) for x in center), image_size=size)
    if view_corrections:
        camera = _fit_view_corrections(camera, soft, ok)

    zbuf, covered = _render_views(vertices, faces, camera)
    none = torch.zeros(NUM_VIEWS, dtype=torch.float64, device=device)
    iou = torch.where(used, _iou(covered, masks), none)
    agree = torch.where(used, _agreement(covered, masks), none)
    return camera, iou, agree, zbuf, covered


def _fit_view_corrections(camera: ViewCamera, soft: _SoftSilhouettes, ok: torch.Tensor) -> ViewCamera:
    """Per-view 2-D corrections (zoom, shift) on top of the shared camera, each view's soft IoU maximised on its own
    within MAX_VIEW_ZOOM / MAX_VIEW_SHIFT: a generator draws each view a little off (a pixel or two, a percent)."""
    device = soft.sil.device
    s = camera.scale
    c = torch.tensor(camera.center, dtype=torch.float32, device=device)  # (3,)
    rc = soft.right @ c  # (6,) right_k . c
    bounds = torch.tensor(
        [np.log1p(MAX_VIEW_ZOOM), MAX_VIEW_SHIFT, MAX_VIEW_SHIFT], dtype=torch.float32, device=device
    )

    def to_q(z: torch.Tensor) -> torch.Tensor:
        """(6, 3) corrections (log zoom, du, dv) -> the objective's per-view q = (log S, A, B)."""
        big_s = s * z[:, 0].exp()  # (6,)
        return torch.stack([big_s.log(), big_s * rc - z[:, 1], big_s * c[1] - z[:, 2]], dim=-1)

    def per_view(z: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = to_q(z)
        iou, g = soft.iou_and_grad(q, images)  # (6,), (6, 3)
        big_s = q[:, 0].exp()
        grad = torch.stack([g[:, 0] + g[:, 1] * big_s * rc + g[:, 2] * big_s * c[1], -g[:, 1], -g[:, 2]], dim=-1)
        # Each view climbs its own IoU and keeps its own best point.
        return iou, grad * ok[:, None]

    def clamp(z: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(z, bounds), -bounds)

    z = _adam_ascent(
        torch.zeros(NUM_VIEWS, 3, device=device), per_view, soft, ((1.5, 20, 0.004), (0.7, 20, 0.0015)), clamp
    )
    zoom = z[:, 0].exp().tolist()
    shift = [(float(du), float(dv)) for du, dv in z[:, 1:].tolist()]
    return ViewCamera(camera.scale, camera.center, camera.image_size, tuple(zoom), tuple(shift))


def _mask_stack(masks: Sequence[torch.Tensor] | Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    if len(masks) != NUM_VIEWS:
        raise ValueError(f"expected {NUM_VIEWS} masks, got {len(masks)}")
    arrays = [
        torch.from_numpy(np.asarray(m.convert("L")) >= 128) if isinstance(m, Image.Image) else torch.as_tensor(m)
        for m in masks
    ]
    if any(a.shape != arrays[0].shape or a.ndim != 2 or a.shape[0] != a.shape[1] for a in arrays):
        raise ValueError("masks must be square and of one size")
    return torch.stack(arrays).to(device=device, dtype=torch.bool)  # (6, S, S)


def signed_volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    """The mesh's signed volume (divergence theorem: exact when closed, an estimate when not); negative when its
    faces wind inwards."""
    return float(torch.linalg.det(vertices[faces].double()).sum()) / 6.0  # (F, 3, 3) corner rows


def _mesh_tensors(mesh: trimesh.Trimesh, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mesh.faces) == 0:
        raise ValueError("cannot texture an empty mesh")
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32)).to(device)  # (V, 3)
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64)).to(device)  # (F, 3)
    # Back-face culling and the normals assume outward winding; a mesh wound inside out (negative signed volume)
    # is drawn with its faces flipped (the returned mesh keeps the input's faces).
    if signed_volume(vertices, faces) < 0:
        faces = faces[:, [0, 2, 1]]
    return vertices, faces


def fit_camera(
    mesh: trimesh.Trimesh,
    masks: Sequence[torch.Tensor] | Sequence[Image.Image],
    *,
    device: torch.device | str | None = None,
    view_corrections: bool = True,
) -> tuple[ViewCamera, list[float], list[float]]:
    """Fit the orthographic camera (scale + 3-D centre) that makes the mesh's six silhouettes match the masks.

    Coarse: silhouette areas and centroids (moments) give the scale and centre in closed form; fine: gradient ascent
    on a soft IoU (blurred reference silhouettes resampled at the candidate camera), coarse-to-fine blur. Empty masks
    are left out of the fit (their IoU and agreement are reported as 0.0). The mesh is not moved.

    Args:
        mesh: trimesh in the export frame. masks: 6 (S, S) bool tensors (`view_masks`) or PIL "L" images.
        device: where rendering runs (default CPU).
        view_corrections: then fit each view's own small zoom and shift (bounded by MAX_VIEW_ZOOM, MAX_VIEW_SHIFT)
            on top of the shared camera, against that view's mask alone.

    Returns:
        The camera, the six silhouette IoUs and agreements within AGREEMENT_PX (`_agreement`, what the stage's
        checks use), of the exact rasterised silhouettes at the fitted camera.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    mask_t = _mask_stack(masks, device)
    vertices, faces = _mesh_tensors(mesh, device)
    used = mask_t.flatten(1).sum(-1) >= MIN_MASK_PIXELS
    camera, iou, agree, _, _ = _fit(vertices, faces, mask_t, used, view_corrections)
    return camera, [float(x) for x in iou], [float(x) for x in agree]


# --------------------------------------------------------------------------------------------- blending


@dataclass
class _Views:
    """What blending needs per view: colours, depth buffers, edge distances, which views are used."""

    camera: ViewCamera
    colors: torch.Tensor  # (6, 3, S, S) in [0, 1]
    zbuf: torch.Tensor  # (6, S, S) depth, -inf where no surface
    edge_distance: torch.Tensor  # (6, 1, S, S) pixels to the nearest mask edge or depth discontinuity
    used: torch.Tensor  # (6,) bool
    full_weight: float = FULL_VIEW_WEIGHT  # summed weight at which the views' colour alone is used (`_blend`)


def _edge_distance(masks: torch.Tensor, zbuf: torch.Tensor, camera: ViewCamera) -> torch.Tensor:
    """(6, 1, S, S) distance in pixels to the nearest pixel that is background, off the mesh, or next to a depth
    jump: near those a view's pixels mix colours of different surfaces."""
    covered = torch.isfinite(zbuf)  # (6, S, S)
    filled = torch.where(covered, zbuf, zbuf[covered].min() if covered.any() else torch.zeros_like(zbuf))
    pooled_max = F.max_pool2d(filled[:, None], 3, stride=1, padding=1)[:, 0]
    pooled_min = -F.max_pool2d(-filled[:, None], 3, stride=1, padding=1)[:, 0]
    jump = (pooled_max - pooled_min) > DEPTH_JUMP_PX * camera.pixel_size  # (6, S, S)
    clean = (masks & covered & ~jump).cpu().numpy()  # (6, S, S)
    dist = np.stack([ndimage.distance_transform_edt(c) for c in clean]).astype(np.float32)  # (6, S, S)
    return torch.from_numpy(dist)[:, None].to(zbuf.device)


def _sample(images: torch.Tensor, proj: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Sample (6, C, S, S) images at projected points (6, N, 3) -> (6, N, C); border clamp."""
    grid = proj[..., :2] / size * 2.0 - 1.0  # (6, N, 2) x = column, y = row, align_corners=False
    out = F.grid_sample(images, grid[:, None], mode=mode, padding_mode="border", align_corners=False)  # (6, C, 1, N)
    return out[:, :, 0].permute(0, 2, 1)


def _view_weights(points: torch.Tensor, normals: torch.Tensor, views: _Views) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view blending weights (6, N) and sampled colours (6, N, 3) for surface points with unit normals."""
    camera, size = views.camera, views.camera.image_size
    proj = camera.project(points)  # (6, N, 3)
    axes = view_axes(points.dtype, points.device)  # (6, 3, 3)
    cos = (normals @ axes[:, 2].T).T.clamp(min=0.0)  # (6, N)
    # Depth test against the nearest pixel's depth buffer (the buffer holds the nearest surface at pixel centres).
    col = proj[..., 0].floor().long().clamp(0, size - 1)
    row = proj[..., 1].floor().long().clamp(0, size - 1)
    flat = views.zbuf.flatten(1)  # (6, S*S)
    nearest = torch.gather(flat, 1, row * size + col)  # (6, N)
    visible = proj[..., 2] >= nearest - DEPTH_BIAS_PX * camera.pixel_size
    inside = (proj[..., 0] >= 0) & (proj[..., 0] <= size) & (proj[..., 1] >= 0) & (proj[..., 1] <= size)
    edge = _sample(views.edge_distance, proj, size)[..., 0]  # (6, N)
    ramp = ((edge - 1.0) / EDGE_FALLOFF_PX).clamp(0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no kink where the falloff starts
    weights = cos**COS_POWER * ramp * (visible & inside & views.used[:, None])  # (6, N)
    return weights, _sample(views.colors, proj, size)


def _blend(
    points: torch.Tensor, normals: torch.Tensor, views: _Views
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The views' colours (N, 3) in [0, 1], view share alpha (N,) in [0, 1] and the best view (N,) of surface points.

    colour = sum_k w_k c_k / sum_k w_k; alpha = smoothstep(sum_k w_k / views.full_weight): where alpha < 1 the
    caller mixes in what lies beneath the views (`_under`), alone where alpha = 0 (no view sees the point).
    """
    colors, alphas, best = [], [], []
    for start in range(0, points.shape[0], CHUNK):
        p, n = points[start : start + CHUNK], normals[start : start + CHUNK]
        w, c = _view_weights(p, n, views)  # (6, n), (6, n, 3)
        total = w.sum(0)  # (n,)
        blended = (w[..., None] * c).sum(0) / total.clamp(min=1e-12)[:, None]  # (n, 3)
        alpha = (total / views.full_weight).clamp(max=1.0)
        alpha = alpha * alpha * (3.0 - 2.0 * alpha)  # (n,) smoothstep
        colors.append(blended)
        alphas.append(alpha)
        best.append(torch.where(total > 0, w.argmax(0), torch.full_like(total, -1, dtype=torch.long)))
    return torch.cat(colors), torch.cat(alphas), torch.cat(best)


def _directed_edges(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every edge of (F, 3) faces in both directions: sources and destinations (6F,) each."""
    return faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1), faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)


def _harmonic_fill(
    faces: torch.Tensor,
    colors: torch.Tensor,
    known: torch.Tensor,
    iterations: int,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Without a fallback: colours for the vertices no view sees, diffused over the mesh's edges from the seen ones
    (Jacobi iterations of the graph Laplacian with the seen vertices fixed), so unseen patches are smooth blends of
    the colours around them rather than a flat grey or a patchwork of nearest colours.

    Args:
        faces: (F, 3); colors: (V, 3) vertex colours (used where `known`); known: (V,) bool. initial: (3,) start
            value of the unknown vertices (default: the seen mean), kept where no seen vertex connects.

    Returns:
        (V, 3): `colors` where known, the diffused colour elsewhere (`initial` where no seen vertex connects).
    """
    if not known.any():
        return torch.full_like(colors, 0.5)
    start = colors[known].mean(dim=0) if initial is None else initial  # (3,)
    filled = torch.where(known[:, None], colors, start)  # (V, 3)
    if known.all():
        return filled
    src, dst = _directed_edges(faces)  # (6F,) each
    into_unknown = ~known[dst]  # only unknown vertices change: iterate over the edges that reach them
    src, dst = src[into_unknown], dst[into_unknown]
    unknown, local = torch.unique(dst, return_inverse=True)  # (U,), (E,)
    degree = torch.bincount(local, minlength=unknown.numel()).to(colors.dtype)[:, None]  # (U, 1)
    for _ in range(iterations):
        total = torch.zeros(unknown.numel(), 3, dtype=colors.dtype, device=colors.device).index_add_(
            0, local, filled[src]
        )
        filled[unknown] = total / degree
    return filled


def _pair_moments(weights: torch.Tensor, samples: torch.Tensor) -> list[tuple[int, int, float, torch.Tensor]]:
    """For each pair of views (j, k) that see common surface: (j, k, weight W, moments (5, 3) = mean_j, mean_k,
    std_j, std_k and their correlation per channel), weighted by min(w_j, w_k) (how well both see each point).
    weights (K, N), samples (K, N, 3): the six views, and possibly a seventh colour source (the anchor of
    `harmonize_views`)."""
    pairs = []
    for j in range(len(weights)):
        for k in range(j + 1, len(weights)):
            w = torch.minimum(weights[j], weights[k]).double()  # (N,)
            total = float(w.sum())
            if total <= 0:
                continue
            cj, ck = samples[j].double(), samples[k].double()  # (N, 3)
            mj, mk = (w[:, None] * cj).sum(0) / total, (w[:, None] * ck).sum(0) / total  # (3,)
            sj = ((w[:, None] * (cj - mj) ** 2).sum(0) / total).sqrt()
            sk = ((w[:, None] * (ck - mk) ** 2).sum(0) / total).sqrt()
            corr = (w[:, None] * (cj - mj) * (ck - mk)).sum(0) / total / (sj * sk).clamp(min=1e-12)
            pairs.append((j, k, total, torch.stack([mj, mk, sj, sk, corr])))
    return pairs


def _solve_pairs(
    pairs: list[tuple[int, int, float | torch.Tensor, torch.Tensor]],
    target: Callable[[int, int, torch.Tensor], torch.Tensor],
    pinned: Sequence[int],
    prior: float,
    size: int = NUM_VIEWS,
) -> torch.Tensor:
    """Weighted least squares over view pairs, per channel: sum_pairs W (x_j - x_k - target(j, k, moments))^2 +
    prior sum x^2 with x pinned at 0 for the `pinned` indices; W a number or one per channel (3,). Returns x
    (size, 3)."""
    lhs = torch.zeros(3, size, size, dtype=torch.float64)
    rhs = torch.zeros(3, size, dtype=torch.float64)
    for j, k, w, moments in pairs:
        r = target(j, k, moments).cpu()  # (3,)
        w = torch.as_tensor(w, dtype=torch.float64).cpu()  # () or (3,): per channel
        lhs[:, j, j] += w
        lhs[:, k, k] += w
        lhs[:, j, k] -= w
        lhs[:, k, j] -= w
        rhs[:, j] += w * r
        rhs[:, k] -= w * r
    stiff = torch.full((size,), prior, dtype=torch.float64)
    stiff[list(pinned)] = 1e9 * (float(lhs.abs().max()) + prior + 1.0)  # the reference stays as it is
    return torch.linalg.solve(lhs + torch.diag(stiff), rhs[..., None])[..., 0].T  # (size, 3)


def _spread_ratio(j: int, k: int, moments: torch.Tensor) -> torch.Tensor:
    """A pair's target for log g_j - log g_k: log(std_k / std_j), equal spreads after correction."""
    return torch.log((moments[3] + 1e-3) / (moments[2] + 1e-3))


def _anchor_chroma(
    log_gain: torch.Tensor,
    pairs: list[tuple[int, int, float, torch.Tensor]],
    to_anchor: list[tuple[int, int, float, torch.Tensor]],
    ref: int,
    strength: float,
    weight: float,
) -> torch.Tensor:
    """The views' log gains (6, 3) with their chroma (each channel's deviation from the view's mean) re-solved with
    the anchor as a seventh source of spreads, `weight` x each view's weight against it; the brightness (the mean
    over channels) stays the pairs' own.

    Why: a view that overlaps no other (the gear's back face: the back view's pairs with the right and left views
    weigh ~0) kept its per-channel cast whatever the pairs said, because the prior alone held its gains at 1; in the
    benchmark a green gain of 1.088 on the back view showed as a green-cyan back. The anchor's spreads are a blurred
    field's, smaller than a view's: its own gain is left free (not pinned), so that common shrinkage cancels
    between the views (the anchor bridges them rather than sets them). Its brightness is less reliable: gains
    with brightness against it cost the clean gear 0.09 dB and the mug 0.03; the chroma alone moved the gear's
    back to within 1.2 % between channels and clean views not at all (issue 15, session 30). A channel in which the
    anchor does not vary with the view says nothing of its gain (a grey field would have equalised every view's
    spreads: a 1.4x green gain on a clean test view): each channel counts by the squared correlation of the view's
    and the anchor's colours over the view's surface.
    """
    bridged = [(j, k, weight * w * m[4].clamp(min=0.0) ** 2, m) for j, k, w, m in to_anchor]  # (3,) weights
    chroma = _solve_pairs(pairs + bridged, _spread_ratio, [ref], strength, NUM_VIEWS + 1)[:NUM_VIEWS]  # (6, 3)
    return chroma - chroma.mean(1, keepdim=True) + log_gain.mean(1, keepdim=True)


def harmonize_views(
    points: torch.Tensor,
    normals: torch.Tensor,
    views: _Views,
    *,
    prior: float | None = None,
    anchor: torch.Tensor | None = None,
    anchor_weight: float | None = None,
    gain_anchor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view, per-channel colour gain and bias that make the views agree where two of them see the surface.

    Generated views drift in colour (the back view most); blending them as they are leaves seams and a patchwork.
    For every pair of views, the colours both see (weighted by how well both see each point) give their means and
    spreads; the gains match the spreads (in log space), then the biases match the means, each solved jointly over
    all pairs by least squares with a prior towards gain 1 / bias 0 and the front view (or the first used one) as
    the reference. Matching moments rather than point-to-point colours: the views' pixels do not land on exactly
    the same surface points (misregistration, a mesh that is not the object), and a point-wise fit then flattens
    the colours (its least-squares gains shrink towards zero).

    Pairs only reach the thin strips two views share: surface one view alone sees keeps that view's cast. An
    `anchor` (the colour-matched fallback at the points: one consistent colour source all round) is a seventh
    source whose mean every view's bias is also fitted to, over all the surface the view sees, with
    `anchor_weight` x the view's weight there, and whose spreads set the chroma of the gains (`_anchor_chroma`,
    `gain_anchor` x the view's weight; the brightness of the gains is left to the pairs).

    Args:
        points, normals: (N, 3) surface points and unit normals (e.g. the mesh's vertices). views: the fitted views.
        prior: weight of the prior per view, relative to the mean pair weight (default HARMONIZE_PRIOR).
        anchor: (N, 3) colours at the points, or None. anchor_weight: default HARMONIZE_ANCHOR. gain_anchor: default
            HARMONIZE_GAIN_ANCHOR (0: the gains from the pairs alone).

    Returns:
        gains (6, 3) and biases (6, 3): corrected colour = gain * colour + bias.
    """
    prior = HARMONIZE_PRIOR if prior is None else prior
    anchor_weight = HARMONIZE_ANCHOR if anchor_weight is None else anchor_weight
    gain_anchor = HARMONIZE_GAIN_ANCHOR if gain_anchor is None else gain_anchor
    weights, samples = _view_weights(points, normals, views)  # (6, N), (6, N, 3)
    used = views.used.tolist()
    ref = 0 if used[0] else used.index(True)
    pairs = _pair_moments(weights, samples)
    if not pairs and anchor is None:
        return torch.ones(NUM_VIEWS, 3).to(points), torch.zeros(NUM_VIEWS, 3).to(points)
    strength = prior * (sum(w for _, _, w, _ in pairs) / len(pairs) if pairs else float(weights.sum()) / NUM_VIEWS)
    log_gain = _solve_pairs(pairs, _spread_ratio, [ref], strength)  # (6, 3)
    size, pinned = NUM_VIEWS, [ref]
    if anchor is not None:
        # Each view against the anchor alone (the view pairs are above), weighed by min(w_j, sum of all w) = w_j:
        # held against it wherever it sees.
        everywhere, colours = weights.sum(0), anchor.to(samples)  # (N,), (N, 3)
        to_anchor = [
            (j, NUM_VIEWS, w, m)
            for j in range(NUM_VIEWS)
            for _, _, w, m in _pair_moments(torch.stack([weights[j], everywhere]), torch.stack([samples[j], colours]))
        ]
        if gain_anchor > 0:
            log_gain = _anchor_chroma(log_gain, pairs, to_anchor, ref, strength, gain_anchor)
        pairs = pairs + [(j, k, anchor_weight * w, m) for j, k, w, m in to_anchor]
        size, pinned = NUM_VIEWS + 1, [ref, NUM_VIEWS]
    gains = log_gain.exp().clamp(1 - MAX_GAIN_CHANGE, 1 + MAX_GAIN_CHANGE)  # (6, 3)
    if anchor is not None:
        gains = torch.cat([gains, torch.ones_like(gains[:1])])  # (7, 3): the anchor's mean as it is
    # b_j - b_k = g_k mean_k - g_j mean_j: equal means after correction.
    biases = _solve_pairs(pairs, lambda j, k, m: gains[k] * m[1] - gains[j] * m[0], pinned, strength, size)
    biases = biases.clamp(-MAX_BIAS_CHANGE, MAX_BIAS_CHANGE)  # (size, 3)
    return gains[:NUM_VIEWS].to(points), biases[:NUM_VIEWS].to(points)


# --------------------------------------------------------------------------------------------- fallback transfer


Fallback = Callable[[torch.Tensor], torch.Tensor]


def _sqrtm(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square root and inverse square root of a symmetric positive definite (3, 3) matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    root = values.clamp(min=1e-12).sqrt()  # (3,)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def color_transfer(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    max_gain: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear colour map that carries one colour distribution onto another: mean and covariance matched.

    Monge-Kantorovich linear transfer (the optimal transport map between two Gaussians): M = S^-1/2 (S^1/2 T S^1/2)^1/2
    S^-1/2 with S, T the source's and target's covariances, b = mean_t - M mean_s. Matching moments, not a pointwise
    least-squares fit: the field's colours are blurred and land a little off the views' (another shape, another
    registration), and a regression's gains then shrink towards zero and flatten the colours. M is symmetric; its
    eigenvalues are bounded to [1 / max_gain, max_gain], so a flat source (zero spread) maps onto the target's mean
    instead of being blown up.

    Args:
        source, target: (N, 3) colours of the same N points; weights: (N,) >= 0 (default all 1).

    Returns:
        matrix (3, 3) and bias (3,) (source's dtype and device): mapped = source @ matrix.T + bias.
    """
    dtype = source.dtype
    src, tgt = source.double(), target.double()
    w = torch.ones(len(src), dtype=torch.float64, device=src.device) if weights is None else weights.double()
    w = w / w.sum().clamp(min=1e-12)  # (N,)
    mean_s, mean_t = w @ src, w @ tgt  # (3,)
    eye = torch.eye(3, dtype=torch.float64, device=src.device)
    cov_s = (src - mean_s).T @ ((src - mean_s) * w[:, None]) + TRANSFER_EPS * eye  # (3, 3)
    cov_t = (tgt - mean_t).T @ ((tgt - mean_t) * w[:, None]) + TRANSFER_EPS * eye
    root_s, inv_root_s = _sqrtm(cov_s)
    middle, _ = _sqrtm(root_s @ cov_t @ root_s)
    matrix = inv_root_s @ middle @ inv_root_s  # (3, 3) symmetric positive definite
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    max_gain = TRANSFER_MAX_GAIN if max_gain is None else max_gain
    matrix = (vectors * values.clamp(1.0 / max_gain, max_gain)) @ vectors.T
    return matrix.to(dtype), (mean_t - matrix @ mean_s).to(dtype)


def _query(fallback: Fallback, points: torch.Tensor) -> torch.Tensor:
    """The fallback's colours (N, 3) in [0, 1] at points (N, 3), in CHUNK pieces, on the points' device."""
    out = [
        torch.as_tensor(fallback(points[i : i + CHUNK]), dtype=points.dtype, device=points.device).clamp(0, 1)
        for i in range(0, len(points), CHUNK)
    ]
    return torch.cat(out) if out else points.new_zeros(0, 3)


def fallback_transfer(
    points: torch.Tensor, normals: torch.Tensor, views: _Views, fallback_colors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour map (`color_transfer`) from the fallback's colours to the views' on surface the views see well.

    TripoSR's colour field is duller and blurrier than the generated views; left as it is, every surface no view
    sees (tops and bottoms: the views are all at elevation 0) keeps that dull colour next to the views' vivid one.
    Fitted on the sample points whose colour is the views' alone (alpha = 1); the identity where fewer than
    TRANSFER_MIN_POINTS are.

    Args:
        points, normals: (N, 3) surface samples (e.g. a subset of the vertices). views: the (harmonised) views.
        fallback_colors: (N, 3) the fallback's colours at the points.

    Returns:
        matrix (3, 3), bias (3,): corrected fallback = fallback @ matrix.T + bias.
    """
    colors, alpha, _ = _blend(points, normals, views)  # (N, 3), (N,)
    seen = alpha >= 1.0 - 1e-6
    if int(seen.sum()) < TRANSFER_MIN_POINTS:
        return torch.eye(3).to(points), torch.zeros(3).to(points)
    return color_transfer(fallback_colors[seen].to(colors), colors[seen])


def _match_colors(
    points: torch.Tensor,
    normals: torch.Tensor,
    views: _Views,
    fallback: Fallback | None,
    harmonize: bool,
    match_fallback: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], Fallback | None]:
    """The colour steps before blending, on sample points (N, 3): the views harmonised (`harmonize_views`, applied
    to `views.colors` in place), the fallback matched to them (`fallback_transfer`); with HARMONIZE_ANCHOR > 0 the
    views harmonised once more against the matched fallback and the fallback re-matched. Returns the views' (6, 3)
    gains and biases, the fallback's (3, 3) matrix and (3,) bias, and the corrected fallback."""
    device = views.colors.device
    gains, biases = torch.ones(NUM_VIEWS, 3, device=device), torch.zeros(NUM_VIEWS, 3, device=device)
    transfer = torch.eye(3, device=device), torch.zeros(3, device=device)

    def apply(g: torch.Tensor, b: torch.Tensor) -> None:
        views.colors = (views.colors * g[:, :, None, None] + b[:, :, None, None]).clamp(0, 1)

    several = int(views.used.sum()) > 1
    if harmonize and several:
        gains, biases = harmonize_views(points, normals, views)  # (6, 3) each
        apply(gains, biases)
    if fallback is None or not match_fallback:
        return (gains, biases), transfer, fallback
    views.full_weight = MATCHED_VIEW_WEIGHT
    field = _query(fallback, points)  # (N, 3) queried once: a real colour field costs a network evaluation
    transfer = fallback_transfer(points, normals, views, field)  # (3, 3), (3,)
    if harmonize and HARMONIZE_ANCHOR > 0:
        # The anchor: the matched fallback, one colour source all round. (Matched to the reference view alone it
        # would not carry the views' casts, but a map fitted on one view's surface extrapolates worse: it moved
        # clean views by up to 0.03 on the test ellipsoid.)
        anchor = (field @ transfer[0].T + transfer[1]).clamp(0, 1)  # (N, 3)
        g, b = harmonize_views(points, normals, views, anchor=anchor)
        apply(g, b)
        gains, biases = g * gains, g * biases + b
        transfer = fallback_transfer(points, normals, views, field)
    return (gains, biases), transfer, _corrected(fallback, *transfer)


def _corrected(fallback: Fallback, matrix: torch.Tensor, bias: torch.Tensor) -> Fallback:
    """The fallback with the colour map applied, clamped to [0, 1]."""

    def colors(points: torch.Tensor) -> torch.Tensor:
        return (_query(fallback, points) @ matrix.T.to(points) + bias.to(points)).clamp(0, 1)  # (N, 3)

    return colors


def _smooth_known(faces: torch.Tensor, values: torch.Tensor, known: torch.Tensor, iterations: int) -> torch.Tensor:
    """Jacobi smoothing of (V, C) values over the edges between known vertices (the others are left as they are)."""
    if iterations <= 0:
        return values
    src, dst = _directed_edges(faces)  # (6F,) each
    inside = known[src] & known[dst]
    src, dst = src[inside], dst[inside]
    degree = torch.bincount(dst, minlength=len(values)).to(values.dtype)[:, None] + 1.0  # (V, 1) self included
    for _ in range(iterations):
        values = torch.where(known[:, None], (values.index_add(0, dst, values[src])) / degree, values)
    return values


def _residual_fill(
    vertices: torch.Tensor, faces: torch.Tensor, residual: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """The views' residual over the corrected fallback (V, 3), known where the views colour a vertex, continued
    into the unseen surface: smoothed over the seen vertices (`_smooth_known`: the residual's texture detail would
    streak), diffused over the mesh (`_harmonic_fill`) and faded by the distance d to the nearest seen vertex,
    exp(-(d / L)^2) with L = RESIDUAL_DECAY x the bounding box's diagonal. At the border the views' colour continues
    (no seam); far from it the corrected field is left. Vertices farther than 3 L (fade < 1e-4) are held at zero,
    so the diffusion only iterates over the band next to the seen surface."""
    if not known.any():
        return torch.zeros_like(residual)
    from scipy.spatial import cKDTree

    length = RESIDUAL_DECAY * float((vertices.amax(0) - vertices.amin(0)).norm()) + 1e-12
    host = vertices.detach().cpu().double().numpy()
    distance, _ = cKDTree(host[known.cpu().numpy()]).query(host)  # (V,) 0 at the seen vertices
    distance = torch.from_numpy(distance).to(residual)  # (V,)
    far = distance > 3 * length
    residual = torch.where(far[:, None], 0.0, _smooth_known(faces, residual, known, RESIDUAL_SMOOTH))  # (V, 3)
    filled = _harmonic_fill(faces, residual, known | far, RESIDUAL_ITERATIONS, initial=torch.zeros(3).to(residual))
    return filled * torch.exp(-((distance / length) ** 2))[:, None]


def _vertex_colors(
    vertices: torch.Tensor, faces: torch.Tensor, normals: torch.Tensor, views: _Views, fallback: Fallback | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, 3) vertex colours, and the part of what lies beneath the views that is interpolated inside faces (V, 3):
    without a fallback the fill diffused from the seen vertices, with one (already corrected) the views' residual
    over it (`_residual_fill`); `_under` adds the fallback itself at each point."""
    vertex_colors, vertex_alpha, _ = _blend(vertices, normals, views)
    known = vertex_alpha >= 0.5
    if fallback is None:
        under = _harmonic_fill(faces, vertex_colors, known, FILL_ITERATIONS)  # (V, 3)
        beneath = under
    else:
        field = fallback(vertices)  # (V, 3)
        under = _residual_fill(vertices, faces, vertex_colors - field, vertex_alpha >= RESIDUAL_KNOWN_ALPHA)
        beneath = (field + under).clamp(0, 1)
    a = vertex_alpha[:, None]
    return a * vertex_colors + (1 - a) * beneath, under


def _under(
    points: torch.Tensor, corners: torch.Tensor, bary: torch.Tensor, under: torch.Tensor, fallback: Fallback | None
) -> torch.Tensor:
    """What lies beneath the views at points (N, 3) inside faces (corner vertex ids (N, 3), barycentrics (N, 3)):
    the vertices' `under` (V, 3) interpolated, plus the (corrected) fallback at the points when there is one."""
    out = (under[corners] * bary[..., None]).sum(dim=1)  # (N, 3)
    return out if fallback is None else (out + fallback(points)).clamp(0, 1)


def _color_masks(colors: Sequence[Image.Image], masks: ViewMasks | Sequence[Image.Image] | None) -> torch.Tensor:
    """Validate the views and masks; the (6, S, S) masks the colour views are fitted and sampled by: their own
    silhouettes (the normal maps' may sit a pixel or two off)."""
    if not isinstance(masks, ViewMasks):
        _check_views(colors, masks)
        return torch.stack(view_masks(colors, masks))
    size = _check_views(colors, None)
    if masks.object.shape != (NUM_VIEWS, size, size) or masks.color.shape != masks.object.shape:
        raise ValueError(f"masks must be ({NUM_VIEWS}, {size}, {size}), got {tuple(masks.object.shape)}")
    return masks.color


def _coverage(
    vertices: torch.Tensor, faces: torch.Tensor, normals: torch.Tensor, face_area: torch.Tensor, views: _Views
) -> tuple[float, list[float]]:
    """Fraction of the surface area the views colour (mostly), and each view's share of it (where its weight is
    the largest), on face centroids weighted by face area."""
    centroids = vertices[faces].mean(dim=1)  # (F, 3)
    face_normals = F.normalize(normals[faces].sum(dim=1), dim=-1)  # (F, 3)
    _, face_alpha, face_best = _blend(centroids, face_normals, views)
    seen = face_alpha >= 0.5  # the views' colour dominates the fallback
    total_area = face_area.sum().clamp(min=1e-20)
    coverage = float((face_area * seen).sum() / total_area)
    return coverage, [float((face_area * (seen & (face_best == k))).sum() / total_area) for k in range(NUM_VIEWS)]


def _atlas_fits(components: int, size: int, padding: int) -> bool:
    """Whether `components` charts (at least one per connected piece) can fit a size² atlas at this padding: each
    takes a (2 padding + 2)² square at the least. Checked first: a hopeless packing costs seconds to fail."""
    return components * (2 * padding + 2) ** 2 <= size * size


def _atlas(
    mesh: trimesh.Trimesh, size: int, method: str, notes: list[str]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int] | None:
    """The mesh's UV atlas ((vmapping, faces, uvs), gutter in texels), degrading instead of failing: the chosen method at the usual
    gutter; the projection atlas at a one-texel gutter (a fragmented mesh: many pieces, many charts); None (the
    caller keeps vertex colours), each step with a warning."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces, dtype=np.int64)
    count = len(mesh.vertices)
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)  # (3F, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    used = np.zeros(count, dtype=bool)
    used[faces.reshape(-1)] = True
    pieces = connected_components(graph, directed=False)[0] - int((~used).sum())  # isolated vertices are no piece
    padding = default_padding(size)
    attempts = [(method, padding), ("projection", 1)]
    for k, (how, pad) in enumerate(attempts):
        if not _atlas_fits(pieces, size, pad):
            continue
        try:
            packed = mesh_atlas(mesh, size, pad, method=how, max_cost=ATLAS_MAX_COST)
        except ValueError:  # the packer gave up (many charts): try the next way
            continue
        if k > 0:
            notes.append(f"the mesh is fragmented ({pieces} pieces): its {size}² texture atlas has a one-texel gutter")
        return packed, pad
    notes.append(
        f"the mesh is too fragmented ({pieces} pieces) for a {size}² texture atlas; "
        "the views' colours are kept as vertex colours"
    )
    return None


def _texture_image(
    mesh: trimesh.Trimesh,
    vertices: torch.Tensor,
    normals: torch.Tensor,
    packed: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int],
    size: int,
    views: _Views,
    fallback: Fallback | None,
    under: torch.Tensor,
) -> trimesh.Trimesh:
    """The UV-textured mesh: every texel of the atlas blends the views; where they do not colour it alone, it takes
    `_under` (the vertices' `under` (V, 3) interpolated inside its face, plus the corrected fallback)."""
    device = vertices.device
    (vmapping, atlas_faces, uvs), padding = packed
    vmap_t = torch.from_numpy(vmapping).to(device)  # (V',)
    atlas_faces_t = torch.from_numpy(atlas_faces).to(device)  # (F', 3)
    texel, face, bary = rasterize_uv(torch.from_numpy(uvs).to(device), atlas_faces_t, size)
    corners = vmap_t[atlas_faces_t[face]]  # (N, 3) original vertex ids
    texel_points = (vertices[corners] * bary[..., None]).sum(dim=1)  # (N, 3)
    texel_normals = F.normalize((normals[corners] * bary[..., None]).sum(dim=1), dim=-1)  # (N, 3)
    texel_colors, texel_alpha, _ = _blend(texel_points, texel_normals, views)  # (N, 3), (N,)
    need = texel_alpha < 1.0  # the views alone colour the rest
    a = texel_alpha[need, None]
    beneath = _under(texel_points[need], corners[need], bary[need], under, fallback)  # (M, 3)
    texel_colors[need] = a * texel_colors[need] + (1 - a) * beneath
    image = torch.zeros(size * size, 3, device=device)  # (S*S, 3)
    written = torch.zeros(size * size, dtype=torch.bool, device=device)
    image[texel] = texel_colors.clamp(0, 1)
    written[texel] = True
    return textured_mesh(
        np.asarray(mesh.vertices, dtype=np.float32)[vmapping],
        atlas_faces,
        uvs,
        image.reshape(size, size, 3),
        written.reshape(size, size),
        padding,
    )


# --------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def texture_from_views(
    mesh: trimesh.Trimesh,
    colors: Sequence[Image.Image],
    *,
    masks: ViewMasks | Sequence[Image.Image] | None = None,
    texture_size: int = 1024,
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    atlas: str = "projection",
    harmonize: bool = True,
    view_corrections: bool = True,
    match_fallback: bool = True,
) -> ViewTexture:
    """Texture `mesh` from the six generated views.

    Args:
        mesh: trimesh in the export frame (TripoSR's `extract_mesh` output).
        colors: 6 PIL images in `VIEW_NAMES` order (square, one size; Wonder3D's are 256²), white background.
        masks: `object_masks(colors, normals)` (its `color` masks: the colour views' own silhouettes, white
            regions of the object kept), or 6 PIL "L" images (255 = object); None: `view_masks(colors)`.
        texture_size: UV texture size, 512..4096.
        fallback: maps (N, 3) export-frame points to (N, 3) colours in [0, 1] for surface no view sees (TripoSR's
            colour field: `triposr.texture.field_color_fn(triposr.mesh.scene_code_query_fn(model, code))`);
            without one, unseen surface takes a smooth fill diffused over the mesh from the seen surface around it.
        device: where the tensor work runs (default CPU).
        atlas: "projection" (default: `triposr.texture.projection_atlas`, well under a second at 100k faces) or
            "xatlas" (fewer seams; tens of seconds at 100k faces on a CPU, minutes at 500k).
        view_corrections: fit per-view 2-D corrections (zoom, shift) on top of the shared camera (`fit_camera`).
        harmonize: correct each view's colour (gain and bias per channel, `harmonize_views`) before blending.
        match_fallback: map the fallback's colours onto the views' (`fallback_transfer`) before it colours unseen
            surface; either way the views' residual over it fades into the unseen surface (`_residual_fill`).

    Returns:
        ViewTexture (textured mesh, vertex colours, coverage, per-view IoU and share, camera, warnings, timings).

    Raises:
        ValueError: a malformed view set (count, type, size) or texture size.
        ViewTextureError (a ValueError): no usable view (all masks empty), or the silhouettes cannot be aligned
            (mean agreement of the used views below MIN_MEAN_AGREEMENT). The caller should keep the field colours.
    Empty masks (an all-white view) drop that view with a warning; the other views still texture the mesh.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    size = check_texture_size(texture_size)
    if atlas not in ("projection", "xatlas"):
        raise ValueError(f"atlas must be 'projection' or 'xatlas', got {atlas!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    vertices, faces = _mesh_tensors(mesh, device)

    t = time.perf_counter()
    mask_t = _color_masks(colors, masks).to(device)  # (6, S, S)
    empty = mask_t.flatten(1).sum(-1) < MIN_MASK_PIXELS  # (6,)
    backdrop, shares = backdrop_views(mask_t)
    used = ~empty & ~backdrop  # (6,)
    for k in range(NUM_VIEWS):
        if empty[k]:
            notes.append(f"view {VIEW_NAMES[k]!r} has no foreground (all white?); it is left out")
        elif backdrop[k]:
            notes.append(
                f"view {VIEW_NAMES[k]!r} is left out: its mask covers {shares[k]:.0%} of the picture's border (a "
                "backdrop, not a silhouette)"
            )
    if not used.any():
        raise ViewTextureError(
            "no view has a silhouette (all blank, or a backdrop over the picture's border); keep the field colours"
        )
    view_colors = _view_colors(colors, device)  # (6, 3, S, S)
    timings["masks"] = time.perf_counter() - t

    t = time.perf_counter()
    camera, iou, agree, zbuf, _ = _fit(vertices, faces, mask_t, used, view_corrections)
    stray = used & (agree < MIN_VIEW_AGREEMENT)  # (6,)
    if 0 < int(stray.sum()) <= MAX_STRAY_VIEWS and int((used & ~stray).sum()) >= NUM_VIEWS - MAX_STRAY_VIEWS:
        # A view whose mask is not the object's (a backdrop both maps kept) would pull the shared camera and paint
        # its background on the surface it alone sees: left out, and the camera fitted to the others.
        for k in torch.nonzero(stray).flatten().tolist():
            notes.append(
                f"view {VIEW_NAMES[k]!r} is left out: its silhouette does not match the mesh (agreement within "
                f"{AGREEMENT_PX} px {float(agree[k]):.2f}, IoU {float(iou[k]):.2f}: a backdrop kept in the view, or "
                "a shape the mesh does not have)"
            )
        used = used & ~stray
        first_iou, first_agree = iou, agree
        camera, iou, agree, zbuf, _ = _fit(vertices, faces, mask_t, used, view_corrections)
        iou, agree = torch.where(stray, first_iou, iou), torch.where(stray, first_agree, agree)
    timings["fit"] = time.perf_counter() - t
    if float(agree[used].mean()) < MIN_MEAN_AGREEMENT:
        raise ViewTextureError(
            f"the mesh's silhouettes do not match the views (mean agreement within {AGREEMENT_PX} px "
            f"{float(agree[used].mean()):.2f} < {MIN_MEAN_AGREEMENT}, IoU {float(iou[used].mean()):.2f}); keep the "
            "field colours"
        )
    for k in torch.nonzero(used & (agree < POOR_AGREEMENT)).flatten().tolist():
        notes.append(
            f"view {VIEW_NAMES[k]!r} matches the mesh's silhouette poorly (agreement within {AGREEMENT_PX} px "
            f"{float(agree[k]):.2f}, IoU {float(iou[k]):.2f})"
        )

    t = time.perf_counter()
    packed = _atlas(mesh, size, atlas, notes)
    timings["atlas"] = time.perf_counter() - t

    t = time.perf_counter()
    views = _Views(camera, view_colors, zbuf, _edge_distance(mask_t, zbuf, camera), used)
    normals, face_area = _vertex_normals(vertices, faces)  # (V, 3), (F,)
    step = max(1, len(vertices) // HARMONIZE_POINTS)
    (gains, biases), transfer, fallback = _match_colors(
        vertices[::step], normals[::step], views, fallback, harmonize, match_fallback
    )
    coverage, share = _coverage(vertices, faces, normals, face_area, views)
    vertex_colors, under = _vertex_colors(vertices, faces, normals, views, fallback)
    vertex_u8 = (vertex_colors.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (V, 3)
    if packed is None:
        textured = trimesh.Trimesh(
            np.asarray(mesh.vertices), np.asarray(mesh.faces), vertex_colors=vertex_u8, process=False
        )
    else:
        textured = _texture_image(mesh, vertices, normals, packed, size, views, fallback, under)
    timings["blend"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    if coverage < 0.5:
        notes.append(f"the views cover only {coverage:.0%} of the surface")
    return ViewTexture(
        mesh=textured,
        vertex_colors=vertex_u8,
        coverage=coverage,
        view_iou=tuple(float(x) for x in iou),
        view_agreement=tuple(float(x) for x in agree),
        camera=camera,
        view_share=tuple(share),
        used_views=tuple(bool(x) for x in used),
        color_gain=tuple(tuple(float(x) for x in g) for g in gains),
        color_bias=tuple(tuple(float(x) for x in b) for b in biases),
        fallback_transfer=tuple(
            tuple(float(x) for x in row) for row in torch.cat([transfer[0], transfer[1][:, None]], 1)
        ),
        warnings=notes,
        timings=timings,
    )
