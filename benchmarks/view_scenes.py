"""Ground-truth scenes for the views → mesh stage: objects, a TripoSR stand-in, and six imperfect Wonder3D views.

`make_case(name, imperfect=Imperfections(), preset="small"|"full")` builds one `Case`:
- the truth: a procedural object (signed distance function, marching cubes) with what TripoSR's field smooths
  away (thin parts, a handle or a hole, concavities, creases) and a photo texture from `skimage.data`, given as a
  colour function of the 3-D point (`Case.color_fn`, triplanar: smooth, defined everywhere, so any surface point
  has a true colour);
- the TripoSR stand-in (`Case.start`): the truth's occupancy on a coarse grid (`start_resolution`, ~1/96 of the
  object's box in the full preset), Gaussian-blurred, marching cubes at 0.5, then put at another scale and centre
  (`truth = start_to_truth[0] * start + start_to_truth[1]`), with blurred, desaturated vertex colours from the same
  field as `Case.fallback` (the `fallback=` of `texture_from_views` / `views_to_mesh`: start-frame points -> RGB);
- the six colour and six normal views at Wonder3D's cameras (`wonder3d_perflow.cameras.view_axes`, orthographic,
  white background; normals in the front camera's OpenGL frame = export axes, RGB = (n + 1) / 2), drawn with the
  project's rasteriser (`triposr.texture.rasterize_screen`) at `supersample`x and box-filtered (antialiased edges
  over white), normals from the SDF's gradient (sharp creases, as Wonder3D draws them). `colors`/`normals` carry
  the imperfections; `clean_colors`/`clean_normals`/`clean_masks` are pixel-exact views of the same truth.

Imperfections (`Imperfections`, every dial 0 = off): per-view, per-channel colour gain and bias (severity by view:
front least, back most), a per-view 2-D shift and scale of the image content, Gaussian blur, smooth noise on the
normals, a colour/normal silhouette mismatch (the normal map's outline grown or shrunk by a pixel or two), and a
near-white region on the object (part of the truth's colour: it is in the clean views too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
import trimesh
from PIL import Image
from scipy import ndimage

OBJECTS = ("mug", "table", "robot", "gear")
# Severity of the colour and geometry errors per view (VIEW_NAMES order: front, front_right, right, back, left,
# front_left): Wonder3D's front view follows the input image closely, the back view is the least constrained.
VIEW_SEVERITY = (0.25, 0.6, 0.8, 1.0, 0.8, 0.6)
START_SCALE = 1.0 / 0.62  # truth units per stand-in unit: TripoSR's mesh lives in other units ...
START_OFFSET = (0.04, -0.13, 0.03)  # ... and at another centre (truth = START_SCALE * start + START_OFFSET)
VIEW_FILL = 0.8  # the object's largest half extent over the six views, in NDC (Wonder3D frames it ~this tight)
WHITE = 0.985  # colour of the white region (251/255: inside the colour mask's white tolerance)


@dataclass(frozen=True)
class Imperfections:
    """What a generator does to the six views. Defaults: a typical Wonder3D output; zero turns a dial off."""

    gain: float = 0.12  # per-channel colour gain 1 ± gain * severity
    bias: float = 0.04  # per-channel colour offset ± bias * severity (colours in [0, 1])
    shift_px: float = 1.5  # per-view image shift, up to this many pixels (times severity, random direction)
    scale: float = 0.015  # per-view image scale 1 ± scale * severity about the image centre
    blur_px: float = 0.7  # Gaussian blur sigma of both maps, in pixels
    normal_noise: float = 0.08  # std of the smooth noise added to the unit normals
    silhouette_px: int = 2  # the normal map's outline grows (odd views) or shrinks (even views) by 1..this px
    white_region: bool = True  # a near-white patch on the object (in the truth: both view sets show it)

    @classmethod
    def none(cls) -> Imperfections:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, False)


@dataclass(frozen=True)
class Preset:
    truth_resolution: int  # marching-cubes grid of the truth mesh (over the object's bounding cube)
    start_resolution: int  # grid of the stand-in's blurred occupancy (TripoSR's field ~1/96 of the box)
    view_size: int
    supersample: int


PRESETS = {
    "small": Preset(truth_resolution=48, start_resolution=48, view_size=128, supersample=1),
    "full": Preset(truth_resolution=192, start_resolution=96, view_size=256, supersample=2),
}


@dataclass
class Case:
    """One ground-truth scene. Frames: `truth` and `color_fn` in the truth frame; `start`, `fallback`,
    `start_camera` in the stand-in's frame; truth point = start_to_truth[0] * start point + start_to_truth[1]."""

    name: str
    truth: trimesh.Trimesh  # vertex colours = color_fn at the vertices
    color_fn: Callable[[np.ndarray], np.ndarray]  # (N, 3) truth-frame points -> (N, 3) RGB in [0, 1]
    start: trimesh.Trimesh  # TripoSR stand-in, vertex colours from `fallback`
    fallback: Callable[[torch.Tensor], torch.Tensor]  # (N, 3) start-frame points -> (N, 3) RGB in [0, 1]
    start_to_truth: tuple[float, np.ndarray]
    camera: object  # t2mv.view_texture.ViewCamera of the views, truth frame
    start_camera: object  # the same camera in the stand-in's frame (what a perfect silhouette fit finds)
    colors: list[Image.Image]  # six RGB views with the imperfections (VIEW_NAMES order)
    normals: list[Image.Image]
    clean_colors: list[Image.Image]
    clean_normals: list[Image.Image]
    clean_masks: list[Image.Image]  # "L", 255 = object (pixel coverage >= 1/2), aligned with the clean views
    imperfect: Imperfections | None
    preset: Preset
    info: dict = field(default_factory=dict)

    def to_truth(self, points: np.ndarray) -> np.ndarray:
        scale, offset = self.start_to_truth
        return np.asarray(points, dtype=np.float64) * scale + offset


# --------------------------------------------------------------------------------------------- signed distances
# Numpy SDFs of (N, 3) points, negative inside; all objects about 1.6 units tall, +Y up, front = +Z.


def _box(p: np.ndarray, half: tuple[float, float, float]) -> np.ndarray:
    q = np.abs(p) - np.asarray(half)
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


def _cylinder(p: np.ndarray, radius: float, half_height: float, axis: int = 1) -> np.ndarray:
    """Capped cylinder along `axis` (sharp rims: creases)."""
    radial = np.linalg.norm(np.delete(p, axis, axis=-1), axis=-1) - radius
    d = np.stack([radial, np.abs(p[:, axis]) - half_height], axis=-1)
    return np.linalg.norm(np.maximum(d, 0.0), axis=-1) + np.minimum(d.max(axis=-1), 0.0)


def _torus_xy(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    """Torus in the XY plane (its hole seen from the front)."""
    q = np.stack([np.hypot(p[:, 0], p[:, 1]) - major, p[:, 2]], axis=-1)
    return np.linalg.norm(q, axis=-1) - minor


def _sphere(p: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(p, axis=-1) - radius


def _at(p: np.ndarray, x: float, y: float, z: float) -> np.ndarray:
    return p - np.array([x, y, z])


def sdf_mug(p: np.ndarray) -> np.ndarray:
    """A mug: thin wall with a sharp rim, an open top (concavity), a handle with a hole."""
    body = _cylinder(p, 0.5, 0.6)
    inside = _cylinder(_at(p, 0, 0.12, 0), 0.42, 0.6)  # open at the top, 0.12 thick bottom
    handle = np.maximum(_torus_xy(_at(p, 0.52, 0.0, 0), 0.3, 0.07), -(p[:, 0] - 0.45))  # only outside the wall
    return np.minimum(np.maximum(body, -inside), handle)


TABLE_LEGS = (0.62, 0.38)  # x, z of the legs' axes; the shelf's corners sit on them


def sdf_table(p: np.ndarray, shelf_inset: float = 0.0) -> np.ndarray:
    """A small table: a thin top (creases), four thin legs, a shelf between them (its half extents `shelf_inset`
    short of the legs' axes)."""
    lx, lz = TABLE_LEGS
    top = _box(_at(p, 0, 0.55, 0), (0.75, 0.04, 0.5))
    legs = np.min([_cylinder(_at(p, sx * lx, -0.15, sz * lz), 0.035, 0.7) for sx in (-1, 1) for sz in (-1, 1)], 0)
    shelf = _box(_at(p, 0, -0.45, 0), (lx - shelf_inset, 0.025, lz - shelf_inset))
    return np.minimum(np.minimum(top, legs), shelf)


def table_hidden(points: np.ndarray) -> np.ndarray:
    """(N,) bool: the table's surface that no elevation-0 view places, its shelf's rim (within 0.04 of its edges,
    inside its footprint).

    The shelf's edges run between the legs' axes, so in every one of the six views the shelf's ends are inside a
    leg's outline (a shelf 0.02 shorter gives the same six masks: `test_no_view_places_the_table_shelf_rim`), and
    seen face-on its depth shows only where it meets a leg, an occlusion inside the object. The stand-in rounds that
    rim 3 px short; a fit that sharpens it there (as the normal maps ask: the shelf's sides are flat) is charged by
    the normal consistency for a crease no view says where to put. Measured (session 30, one run, imperfect views):
    normal consistency start -> refined 0.9723 -> 0.9657 overall, 0.9793 -> 0.9864 without this rim (7.1 % of the
    area; at 256² the shorter shelf changes 2 outline pixels in 3 of the six masks)."""
    lx, lz = TABLE_LEGS
    shelf = (points[:, 1] > -0.485) & (points[:, 1] < -0.415)
    x, z = np.abs(points[:, 0]), np.abs(points[:, 2])
    rim = (lx - x < 0.04) | (lz - z < 0.04)
    # Within the shelf's footprint (marching cubes' tolerance): the legs' outer halves, which the outlines place, stay.
    footprint = (x < lx + 0.006) & (z < lz + 0.006)
    return shelf & rim & footprint


# Surface of each truth (a predicate over truth-frame points) that the six views do not place: reported apart
# (`*_placed` metrics of `benchmarks.view_quality`).
HIDDEN: dict[str, Callable[[np.ndarray], np.ndarray]] = {"table": table_hidden}


def sdf_robot(p: np.ndarray) -> np.ndarray:
    """A toy robot: boxy torso and head (creases), thin arms and antenna, a square window through the torso."""
    torso = np.maximum(_box(_at(p, 0, -0.2, 0), (0.38, 0.45, 0.25)), -_box(_at(p, 0, -0.25, 0), (0.12, 0.12, 0.5)))
    head = _box(_at(p, 0, 0.42, 0.02), (0.24, 0.18, 0.2))
    arms = np.minimum(
        _cylinder(_at(p, 0.42, -0.15, 0), 0.045, 0.4),
        _cylinder(_at(p, -0.42, -0.05, 0.05), 0.045, 0.4),
    )
    antenna = np.minimum(_cylinder(_at(p, 0.08, 0.75, 0), 0.018, 0.14), _sphere(_at(p, 0.08, 0.9, 0), 0.05))
    legs = np.minimum(
        _box(_at(p, 0.18, -0.78, 0), (0.1, 0.14, 0.14)), _box(_at(p, -0.18, -0.78, 0), (0.1, 0.14, 0.14))
    )
    return np.min([torso, head, arms, antenna, legs], 0)


def sdf_gear(p: np.ndarray) -> np.ndarray:
    """A gear standing upright facing the viewer: 12 sharp teeth, a hole in the middle, a recessed hub."""
    radius = np.hypot(p[:, 0], p[:, 1])
    angle = np.arctan2(p[:, 1], p[:, 0])
    tooth = np.clip(np.cos(12 * angle) * 4.0, -1.0, 1.0) * 0.07  # square-ish teeth: sharp flanks
    disc = np.maximum(radius - (0.72 + tooth), np.abs(p[:, 2]) - 0.16)
    recess = np.maximum(np.maximum(radius - 0.5, 0.28 - radius), 0.1 - np.abs(p[:, 2]))  # 6 cm deep, both faces
    hole = _cylinder(p, 0.2, 1.0, axis=2)
    stand = _box(_at(p, 0, -0.78, 0), (0.3, 0.06, 0.22))
    gear = np.maximum(np.maximum(disc, -recess), -hole)
    return np.minimum(gear, stand)


SDFS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mug": sdf_mug,
    "table": sdf_table,
    "robot": sdf_robot,
    "gear": sdf_gear,
}
TEXTURES = {"mug": "coffee", "table": "chelsea", "robot": "astronaut", "gear": "immunohistochemistry"}
WHITE_DIRECTION = {"mug": (1, 0.2, 0.3), "table": (0.3, 1, 0.2), "robot": (-1, 0.1, 0.3), "gear": (-0.6, 0.6, 0.5)}


def sdf_normal(sdf: Callable[[np.ndarray], np.ndarray], points: np.ndarray, eps: float = 2e-3) -> np.ndarray:
    """Outward unit normals: the SDF's central-difference gradient at (N, 3) points."""
    grad = np.stack([sdf(points + eps * e) - sdf(points - eps * e) for e in np.eye(3)], axis=-1)  # (N, 3)
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


BOX = 1.05  # every object lies inside [-BOX, BOX]^3


def sdf_mesh(sdf: Callable[[np.ndarray], np.ndarray], resolution: int, blur: float = 0.0) -> trimesh.Trimesh:
    """Marching cubes over [-BOX, BOX]^3 at `resolution` points per side: of the SDF itself (blur = 0), or of the
    occupancy (SDF < 0) blurred by a Gaussian of `blur` grid steps, at level 1/2 (the TripoSR stand-in)."""
    from skimage.measure import marching_cubes

    axis = np.linspace(-BOX, BOX, resolution)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)  # (R^3, 3)
    values = sdf(grid).reshape((resolution,) * 3)
    if blur > 0:
        values = 0.5 - ndimage.gaussian_filter((values < 0).astype(np.float32), blur)  # > 0 outside, like an SDF
    step = 2 * BOX / (resolution - 1)
    verts, faces, _, _ = marching_cubes(values, level=0.0, spacing=(step,) * 3)
    mesh = trimesh.Trimesh(verts - BOX, faces, process=True)
    if blur > 0:
        from triposr.mesh import keep_largest_component

        mesh = keep_largest_component(mesh)  # a blurred-away thin part can leave a floater; TripoSR drops them too
    if mesh.volume < 0:
        mesh.invert()
    return mesh


# --------------------------------------------------------------------------------------------- colours


@lru_cache(maxsize=8)
def _photo(name: str, blur_px: float) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255.0  # (H, W, 3)
    sigma = max(blur_px, 0.5)  # a little blur always: the photo is sampled at about view resolution
    return np.stack([ndimage.gaussian_filter(image[..., c], sigma) for c in range(3)], axis=-1)


@dataclass(frozen=True)
class PhotoColor:
    """A photo wrapped triplanarly around the object: the colour of any 3-D point (truth frame).

    Each axis projects the photo on the plane across it; the three are blended by |n_i|^4 of the object's SDF
    gradient at the point (`sdf`: a key of SDFS; defined off the surface too, so the stand-in's field can use it),
    or of the point's direction from the origin without one. Colours are kept within [0.06, 0.9] so that only the
    white region reaches the views' white-background tolerance. The white region is chosen by direction from the
    origin.
    """

    photo: str
    sdf: str | None = None
    blur_px: float = 0.0  # Gaussian blur of the photo (the stand-in field's colour is blurred)
    saturation: float = 1.0  # 1 = the photo's, 0 = grey (the stand-in field's is desaturated)
    white_direction: tuple[float, float, float] | None = None  # centre of the near-white patch, if any
    white_cos: float = 0.95  # the patch: directions within acos(white_cos) of white_direction

    def __call__(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        image = _photo(self.photo, self.blur_px)
        h, w = image.shape[:2]
        d = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-9)  # (N, 3)
        n = d if self.sdf is None else sdf_normal(SDFS[self.sdf], p, eps=0.01)  # (N, 3)
        weight = n**4 / np.maximum((n**4).sum(-1, keepdims=True), 1e-12)  # (N, 3)
        out = np.zeros_like(p)
        for axis, (a, b) in enumerate(((2, 1), (0, 2), (0, 1))):  # plane across X: (z, y); Y: (x, z); Z: (x, y)
            col = (p[:, a] + BOX) / (2 * BOX) * (w - 1)
            row = (BOX - p[:, b]) / (2 * BOX) * (h - 1)
            sample = np.stack(
                [ndimage.map_coordinates(image[..., c], [row, col], order=1, mode="reflect") for c in range(3)], -1
            )  # (N, 3)
            out += weight[:, axis : axis + 1] * sample
        out = 0.06 + 0.84 * out
        if self.saturation != 1.0:
            grey = out.mean(-1, keepdims=True)
            out = grey + self.saturation * (out - grey)
        if self.white_direction is not None:
            u = np.asarray(self.white_direction, dtype=np.float64)
            t = np.clip((d @ (u / np.linalg.norm(u)) - self.white_cos) / 0.02, 0.0, 1.0)[:, None]  # (N, 1) sharp
            out = out * (1 - t) + WHITE * t
        return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True)
class StandInField:
    """TripoSR's colour field stand-in, as `texture_from_views(fallback=...)` takes it: (N, 3) start-frame points
    (any device) -> (N, 3) float32 RGB in [0, 1] on the same device."""

    color: PhotoColor
    scale: float
    offset: tuple[float, float, float]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        p = points.detach().cpu().double().numpy() * self.scale + np.asarray(self.offset)
        return torch.from_numpy(self.color(p).astype(np.float32)).to(points.device)


# --------------------------------------------------------------------------------------------- views


def view_camera(mesh: trimesh.Trimesh, image_size: int):
    """Wonder3D-like framing of the truth: centred on its box, its largest half extent over the six views at
    VIEW_FILL of the image."""
    from t2mv.view_texture import ViewCamera
    from wonder3d_perflow.cameras import view_axes

    center = mesh.bounds.mean(axis=0)
    cam = np.einsum("kij,nj->kni", view_axes(torch.float64).numpy(), mesh.vertices - center)  # (6, V, 3)
    scale = VIEW_FILL / float(np.abs(cam[..., :2]).max())
    return ViewCamera(scale=scale, center=tuple(float(c) for c in center), image_size=image_size)


def _render(mesh, sdf, color_fn, camera, supersample: int):
    """Premultiplied colour and normal, and coverage, of the six views, box-filtered from `supersample`x.

    Returns colour (6, S, S, 3), normal (6, S, S, 3) (both premultiplied by coverage), alpha (6, S, S).
    """
    from t2mv.view_texture import ViewCamera
    from triposr.texture import rasterize_screen

    size, ss = camera.image_size, supersample
    n = size * ss
    big = ViewCamera(scale=camera.scale, center=camera.center, image_size=n)
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))  # (V, 3)
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))  # (F, 3)
    proj = big.project(vertices)  # (6, V, 3)
    color, normal, alpha = (np.zeros((6, n * n, c)) for c in (3, 3, 1))
    for k in range(6):
        pixel, face, bary = rasterize_screen(proj[k, :, :2], proj[k, :, 2], faces, n, n)
        p = (vertices[faces[face]].double() * bary.double()[..., None]).sum(dim=1).numpy()  # (N, 3) surface points
        color[k, pixel.numpy()] = color_fn(p)
        normal[k, pixel.numpy()] = sdf_normal(sdf, p)
        alpha[k, pixel.numpy()] = 1.0

    def box(a: np.ndarray) -> np.ndarray:  # (6, n*n, C) -> (6, S, S, C), mean over ss x ss blocks
        return a.reshape(6, size, ss, size, ss, -1).mean(axis=(2, 4))

    return box(color), box(normal), box(alpha)[..., 0]


def _warp(maps: np.ndarray, factor: float, dx: float, dy: float) -> np.ndarray:
    """Scale (about the image centre) and shift the content of one view's (S, S, C) premultiplied maps, bilinear:
    output pixel q shows input point (q - c - shift) / factor + c (pixel centres at integer + 1/2)."""
    size = maps.shape[0]
    c = size / 2 - 0.5  # the image centre in index units
    offset = np.array([c - (c + dy) / factor, c - (c + dx) / factor])  # (row, col)
    out = [
        ndimage.affine_transform(maps[..., i], np.full(2, 1 / factor), offset=offset, order=1, mode="constant")
        for i in range(maps.shape[-1])
    ]
    return np.stack(out, axis=-1)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + 0.5


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _compose(premul: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight colour over white from a premultiplied colour and its coverage."""
    return premul + (1.0 - alpha[..., None])


def _views(color, normal, alpha, imperfect: Imperfections, rng: np.random.Generator):
    """The two sets of six PIL images from the rendered maps, with the colour, blur, noise and outline errors."""
    colors, normals = [], []
    for k in range(6):
        a = alpha[k]  # (S, S)
        straight = color[k] / np.maximum(a, 1e-9)[..., None]  # (S, S, 3)
        sev = VIEW_SEVERITY[k]
        gain = 1.0 + imperfect.gain * sev * rng.uniform(-1, 1, 3)
        bias = imperfect.bias * sev * rng.uniform(-1, 1, 3)
        straight = np.clip(straight * gain + bias, 0.0, 1.0)
        rgb = _compose(straight * a[..., None], a)
        # Normals: unit directions where covered, smooth noise, then the outline grown or shrunk.
        nrm = normal[k] / np.maximum(np.linalg.norm(normal[k], axis=-1, keepdims=True), 1e-9)  # (S, S, 3)
        if imperfect.normal_noise > 0:
            noise = np.stack([ndimage.gaussian_filter(rng.normal(size=a.shape), 1.5) for _ in range(3)], -1)
            noise *= imperfect.normal_noise / max(float(noise.std()), 1e-9)
            nrm = nrm + noise
            nrm /= np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-9)
        an = a
        if imperfect.silhouette_px > 0:
            r = int(rng.integers(1, imperfect.silhouette_px + 1))
            an = (ndimage.grey_dilation if k % 2 else ndimage.grey_erosion)(a, footprint=_disk(r))
            _, (ri, ci) = ndimage.distance_transform_edt(a < 0.5, return_indices=True)
            nrm = nrm[ri, ci]  # new outline pixels take the nearest covered pixel's normal
        nrgb = _compose((nrm + 1.0) / 2.0 * an[..., None], an)
        if imperfect.blur_px > 0:
            rgb = np.stack([ndimage.gaussian_filter(rgb[..., c], imperfect.blur_px) for c in range(3)], -1)
            nrgb = np.stack([ndimage.gaussian_filter(nrgb[..., c], imperfect.blur_px) for c in range(3)], -1)
        colors.append(_to_image(rgb))
        normals.append(_to_image(nrgb))
    return colors, normals


def _warps(imperfect: Imperfections, rng: np.random.Generator) -> np.ndarray:
    """(6, 3): per view (scale factor, shift x px, shift y px), larger for the less constrained views."""
    warps = np.zeros((6, 3))
    for k, sev in enumerate(VIEW_SEVERITY):
        angle = rng.uniform(0, 2 * np.pi)
        shift = imperfect.shift_px * (0.5 + 0.5 * sev) * rng.uniform(0.7, 1.0)
        warps[k] = (
            1.0 + imperfect.scale * sev * rng.choice([-1.0, 1.0]),
            shift * np.cos(angle),
            shift * np.sin(angle),
        )
    return warps


# --------------------------------------------------------------------------------------------- cases


@lru_cache(maxsize=16)
def truth_mesh(name: str, resolution: int) -> trimesh.Trimesh:
    return sdf_mesh(SDFS[name], resolution)


@lru_cache(maxsize=16)
def stand_in_mesh(name: str, resolution: int) -> trimesh.Trimesh:
    """The truth's occupancy on a `resolution`³ grid, blurred by one grid step, marching cubes at 1/2 (truth frame)."""
    return sdf_mesh(SDFS[name], resolution, blur=1.0)


def make_case(
    name: str,
    *,
    imperfect: Imperfections | None = Imperfections(),
    preset: str | Preset = "small",
    view_size: int | None = None,
    start_resolution: int | None = None,
    seed: int = 0,
) -> Case:
    """One ground-truth scene (see the module docstring). `imperfect=None`: the views are the clean ones."""
    if name not in SDFS:
        raise ValueError(f"unknown object {name!r}; choose from {', '.join(OBJECTS)}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, view_size=view_size or p.view_size, start_resolution=start_resolution or p.start_resolution)
    rng = np.random.default_rng([seed, OBJECTS.index(name)])
    white = imperfect is not None and imperfect.white_region
    # The photo spans the object's box once (~240 photo px per unit, ~100 view px per unit at 256²): blurred by
    # 3 photo px, the truth's detail is about what a 256² view can carry (finer detail no method could recover
    # from the views would only add the same floor to every variant). TripoSR's field: ~3x blurrier, dull.
    color_fn = PhotoColor(TEXTURES[name], name, blur_px=3.0, white_direction=WHITE_DIRECTION[name] if white else None)
    field_color = PhotoColor(TEXTURES[name], name, blur_px=10.0, saturation=0.45)
    truth = truth_mesh(name, p.truth_resolution).copy()
    truth.visual.vertex_colors = (color_fn(truth.vertices) * 255).round().astype(np.uint8)
    camera = view_camera(truth, p.view_size)

    offset = np.asarray(START_OFFSET)
    smooth = stand_in_mesh(name, p.start_resolution)
    start = trimesh.Trimesh((smooth.vertices - offset) / START_SCALE, smooth.faces.copy(), process=False)
    fallback = StandInField(field_color, START_SCALE, START_OFFSET)
    start.visual.vertex_colors = (fallback(torch.from_numpy(start.vertices)).numpy() * 255).round().astype(np.uint8)
    from t2mv.view_texture import ViewCamera

    start_camera = ViewCamera(
        scale=camera.scale * START_SCALE,
        center=tuple(float(c) for c in (np.asarray(camera.center) - offset) / START_SCALE),
        image_size=p.view_size,
    )

    sdf = SDFS[name]
    color, normal, alpha = _render(truth, sdf, color_fn, camera, p.supersample)
    clean_colors, clean_normals = _views(color, normal, alpha, Imperfections.none(), rng)
    clean_masks = [Image.fromarray(((a >= 0.5) * 255).astype(np.uint8)) for a in alpha]
    if imperfect is None:
        colors, normals = clean_colors, clean_normals
    else:
        # One generation gives a view's colour and normals: the same shift and scale for both.
        stacked = np.concatenate([color, normal, alpha[..., None]], axis=-1)  # (6, S, S, 7)
        warped = np.stack([_warp(stacked[k], *w) for k, w in enumerate(_warps(imperfect, rng))])
        colors, normals = _views(warped[..., :3], warped[..., 3:6], warped[..., 6], imperfect, rng)
    info = {
        "truth_faces": int(len(truth.faces)),
        "start_faces": int(len(start.faces)),
        "view_size": p.view_size,
        "start_resolution": p.start_resolution,
        "photo": TEXTURES[name],
    }
    return Case(
        name=name,
        truth=truth,
        color_fn=color_fn,
        start=start,
        fallback=fallback,
        start_to_truth=(START_SCALE, offset),
        camera=camera,
        start_camera=start_camera,
        colors=colors,
        normals=normals,
        clean_colors=clean_colors,
        clean_normals=clean_normals,
        clean_masks=clean_masks,
        imperfect=imperfect,
        preset=p,
        info=info,
    )
