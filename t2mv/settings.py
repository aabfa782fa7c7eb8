"""GenerationSettings: every generation option of the chain, its default, its bounds, checked once.

One frozen dataclass owns each option's default, its smoke-mode default, its allowed range and its help text.
The command lines (``t2mv``, ``t2mv-multiview``, ``t2mv-mesh``), the batch tool and the app build a
`GenerationSettings`, call `validate()` once (before any model loads), and hand it to `TextTo3D`; nothing
downstream re-checks it.

Adding an option is a one-place change: declare the field below with `option(...)`. Its default, bounds, smoke
default, help text, command-line flag and slider step come from that declaration; `validate()`, `to_dict()`,
`bounds()`, the CLI flags (`add_arguments`, `from_namespace`) and the app's sliders all read it from there.

The bounds come from the stages' own constants: PeRFlow needs at least one step per time window (both stages;
fewer is an error here, never a silent raise), the marching-cubes range is `triposr.mesh`'s range intersected
with what the chain supports, the texture range is `triposr.texture`'s, the seed fits every generator.
"""

from __future__ import annotations

import argparse
import math
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from triposr.mesh import MAX_RESOLUTION as TRIPOSR_MAX_RESOLUTION
from triposr.mesh import MIN_RESOLUTION as TRIPOSR_MIN_RESOLUTION
from triposr.texture import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE

from .candidates import MAX_CANDIDATES
from .errors import BadInputError
from .text_to_image import CHAIN_PRESET, PERFLOW_SD15_SCHEDULER

# PeRFlow runs one UNet pass per time window at least; both PeRFlow stages were trained with 4 windows
# (text-to-image: `PERFLOW_SD15_SCHEDULER`; multiview: `wonder3d_perflow.pipeline.TRAINED_TIME_WINDOWS`, kept
# equal by tests/test_chain.py without importing the multiview pipeline here, which costs seconds).
T2I_TIME_WINDOWS: int = int(PERFLOW_SD15_SCHEDULER["num_time_windows"])
MV_TIME_WINDOWS: int = 4
MAX_STEPS = 100  # beyond this PeRFlow gains nothing; the bound only stops runaway requests
MAX_SEED = 2**32 - 1  # numpy / CUDA generators and the app's seed box take 32-bit seeds
# The chain keeps three models resident; at 1024³ the density grid alone is 4 GiB (float32) on top of them,
# so the chain stops at 512 (1 GiB). triposr.mesh allows 32..1024 on its own.
CHAIN_MAX_MC_RESOLUTION = 512
MIN_MC_RESOLUTION = max(TRIPOSR_MIN_RESOLUTION, 32)
MAX_MC_RESOLUTION = min(TRIPOSR_MAX_RESOLUTION, CHAIN_MAX_MC_RESOLUTION)
MAX_SIMPLIFY_FACES = 10_000_000
MV_PREPROCESS_MODES = ("wonder3d", "perflow")
TEXTURE_SOURCES = ("views", "field")
GROUPS = ("seed", "text_to_image", "preprocess", "multiview", "mesh", "views")
STAGES = ("text_to_image", "multiview", "mesh")
# Which stages an option needs, besides the three stages themselves: "diffusion" (either diffusion stage: the seed),
# "preprocess" (either image stage: background removal), "views" (both the views and the mesh: texture, refine).
SCOPES = (*STAGES, "diffusion", "preprocess", "views")


def scopes_of(stages: Iterable[str]) -> set[str]:
    """The option scopes a command that runs `stages` uses: its stages, plus the combined scopes they make."""
    stages = set(stages)
    assert stages <= set(STAGES), f"stages must be a subset of {STAGES}, got {sorted(stages)}"
    scopes = set(stages)
    if stages & {"text_to_image", "multiview"}:
        scopes.add("diffusion")
    if stages & {"multiview", "mesh"}:
        scopes.add("preprocess")
    if {"multiview", "mesh"} <= stages:
        scopes.add("views")
    return scopes


@dataclass(frozen=True)
class OptionSpec:
    """What the UI and the command line need to know about one option.

    Attributes:
        name: the field name (``t2i_steps``).
        kind: ``int``, ``float``, ``bool`` or ``str``.
        default: the real-weights default; `smoke_default` the smoke-mode one.
        low, high: inclusive bounds (None: unbounded; floats must still be finite).
        choices: allowed values of a ``str`` option.
        multiple_of: ints only: the value must be a multiple of it.
        zero_allowed: ints only: 0 is allowed besides [low, high] (``simplify_faces``: 0 = keep all faces).
        group: ``seed``, ``text_to_image``, ``preprocess``, ``multiview``, ``mesh`` or ``views`` (the heading it is
            shown under in ``--help`` and the app).
        scope: what it needs to do anything (see `SCOPES`): a command shows the option only when it runs that
            stage (``mv_foreground_ratio``: ``multiview``; ``remove_background``: ``preprocess``, either image stage).
        label: a short label for the UI; `help` the longer text for ``--help``.
        flag: the command-line flag (a bool option with default True gets a ``--no-...`` flag).
        step: the UI slider step.
    """

    name: str
    kind: str
    default: Any
    smoke_default: Any
    low: float | None
    high: float | None
    choices: tuple[str, ...] | None
    multiple_of: int | None
    zero_allowed: bool
    group: str
    scope: str
    label: str
    help: str
    flag: str
    step: float | None

    def describe_range(self) -> str:
        """The allowed values in words, for messages: ``an integer in [4, 100]``."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "one of " + ", ".join(repr(c) for c in self.choices or ())
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.low is None and self.high is None:
            text = what
        else:
            text = f"{what} in [{_number(self.low)}, {_number(self.high)}]"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        if self.zero_allowed:
            text = f"0 or {text}"
        return text


def _number(value: float | None) -> str:
    """``4294967295`` (not ``4.29497e+09``) for whole numbers, ``0.3`` for the rest."""
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def option(
    default: Any,
    *,
    group: str,
    label: str,
    help: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
    multiple_of: int | None = None,
    zero_allowed: bool = False,
    smoke: Any = MISSING,
    flag: str | None = None,
    step: float | None = None,
    scope: str | None = None,
) -> Any:
    """Declare one option of `GenerationSettings` (a dataclass field carrying its `OptionSpec` pieces).

    `scope` (see `SCOPES`) defaults to the group where the group names one: ``text_to_image``, ``multiview``,
    ``mesh``, ``views``, ``preprocess``; a ``seed`` option defaults to ``diffusion``. Every command that runs that
    scope gets the option's flag, under the one name `flag` (default ``--<name with dashes>``).
    """
    assert group in GROUPS, group
    scope = scope or ("diffusion" if group == "seed" else group)
    assert scope in SCOPES, scope
    meta = {
        "group": group,
        "scope": scope,
        "label": label,
        "help": help,
        "low": low,
        "high": high,
        "choices": choices,
        "multiple_of": multiple_of,
        "zero_allowed": zero_allowed,
        "smoke": default if smoke is MISSING else smoke,
        "flag": flag,
        "step": step,
    }
    return field(default=default, metadata={"t2mv": meta})


# Settings that passed `validate()` (frozen, so they stay valid; equal settings are equally valid). Kept outside the
# instances so that fields, equality, repr and ``__dict__`` stay exactly the options.
_VALIDATED: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class GenerationSettings:
    """Every generation option of the chain. Build it, `validate()` it once, hand it to `TextTo3D`.

    ``GenerationSettings()`` holds the real-weights defaults, `GenerationSettings.smoke()` the smoke-mode ones
    (small image, coarse mesh). Change options with `with_changes(**values)`; read the bounds with `bounds()`.
    """

    seed: int = option(0, group="seed", label="Seed", help="seed of every stage's noise", low=0, high=MAX_SEED, step=1)
    # text to image (PeRFlow SD1.5)
    t2i_steps: int = option(
        int(CHAIN_PRESET["num_inference_steps"]),
        group="text_to_image",
        label="Text-to-image steps",
        # The bound per model kind (PeRFlow: one step per time window at least) is `t2i_kind_problem`'s.
        help=f"steps: PeRFlow at least {T2I_TIME_WINDOWS} (one per time window), rectified flow (InstaFlow) at least "
        "1; a rectified-flow --t2i-model brings its own defaults (InstaFlow: 1 step, no guidance)",
        low=1,
        high=MAX_STEPS,
        step=1,
    )
    t2i_guidance: float = option(
        float(CHAIN_PRESET["guidance_scale"]),
        group="text_to_image",
        label="Text-to-image CFG",
        help="classifier-free guidance (1 or less: off)",
        low=0.0,
        high=30.0,
        step=0.5,
    )
    height: int = option(
        512, group="text_to_image", label="Height", help="image height", low=64, high=1024, multiple_of=8, smoke=64
    )
    width: int = option(
        512, group="text_to_image", label="Width", help="image width", low=64, high=1024, multiple_of=8, smoke=64
    )
    upscale: int = option(
        0,
        group="text_to_image",
        label="Upscale (PeRFlow-Refiner)",
        help="also refine the image to this side with the PeRFlow-Refiner (ControlNet-Tile img2img, 4 steps) and "
        "write image_<side>.png; the 3D stages keep the image as made; 0 = off",
        low=128,
        high=2048,
        multiple_of=64,
        zero_allowed=True,
        step=64,
    )
    candidates: int = option(
        1,
        group="text_to_image",
        label="Candidate images",
        help="images made from the prompt in one batch (seeds seed, seed+1, ...); the one best suited to 3D (one "
        "whole object, not cut by the frame, on a plain background) goes on to the 3D stages",
        low=1,
        high=MAX_CANDIDATES,
        step=1,
    )
    choose: int = option(
        -1,
        group="text_to_image",
        label="Candidate to use (-1: the best-scored)",
        help="which candidate (0 .. candidates-1) goes on to 3D instead of the best-scored one; -1: automatic",
        low=-1,
        high=MAX_CANDIDATES - 1,
        step=1,
    )
    # background removal and the two stages' inputs
    remove_background: bool = option(
        True,
        group="preprocess",
        label="Remove background",
        help="cut the object out with rembg (u2net) when the image has no transparency",
        flag="--no-remove-bg",
    )
    mv_preprocess: str = option(
        "wonder3d",
        group="preprocess",
        label="Multiview input",
        help="multiview input: crop + recentre (wonder3d) or the PeRFlow demo's resize + whiten (perflow)",
        choices=MV_PREPROCESS_MODES,
        scope="multiview",
    )
    mv_foreground_ratio: float = option(
        0.75,  # Wonder3D's recentring ratio
        group="preprocess",
        label="Foreground ratio (multiview)",
        help="object size in the multiview input (wonder3d preprocessing)",
        low=0.3,
        high=1.0,
        step=0.05,
        scope="multiview",
    )
    mesh_foreground_ratio: float = option(
        0.85,  # TripoSR's
        group="preprocess",
        label="Foreground ratio (mesh)",
        help="object size in the TripoSR input",
        low=0.3,
        high=1.0,
        step=0.05,
        scope="mesh",
    )
    # multiview (Wonder3D + PeRFlow)
    mv_steps: int = option(
        4,  # upstream asks for 1 step but its scheduler runs 4 (one per window); we say so instead
        group="multiview",
        label="Multiview steps",
        help=f"PeRFlow steps (at least {MV_TIME_WINDOWS}: one per time window)",
        low=MV_TIME_WINDOWS,
        high=MAX_STEPS,
        step=1,
    )
    mv_guidance: float = option(
        1.0,
        group="multiview",
        label="Multiview CFG (1 = off)",
        help="classifier-free guidance; 1.0 = none, as upstream",
        low=1.0,
        high=30.0,
        step=0.5,
    )
    # mesh (TripoSR)
    mc_resolution: int = option(
        256,
        group="mesh",
        label="Marching-cubes resolution",
        help="marching cubes grid",
        low=MIN_MC_RESOLUTION,
        high=MAX_MC_RESOLUTION,
        smoke=32,
        step=32,
    )
    mc_threshold: float = option(
        25.0, group="mesh", label="Density threshold", help="density level of the surface", step=0.5
    )
    texture_source: str = option(
        "views",
        group="views",
        label="Mesh colours from",
        help="views: a UV texture projected from the six generated colour views (field colours where no view "
        "sees the surface); field: TripoSR's colour field (vertex colours, or a baked texture with --bake-texture). "
        "Without the multiview stage the field is used",
        choices=TEXTURE_SOURCES,
    )
    refine: bool = option(
        False,
        group="views",
        label="Refine the shape from the normal maps",
        help="fit the mesh to the six generated normal maps and silhouettes before texturing (needs the multiview "
        "stage; a result that fits worse than the input is rejected with a warning)",
    )
    refine_iterations: int = option(
        200,
        group="views",
        label="Refinement iterations",
        help="optimisation steps of --refine",
        low=10,
        high=2000,
        smoke=20,
        step=10,
    )
    bake_texture: bool = option(
        False, group="mesh", label="Bake a UV texture", help="bake a UV texture instead of vertex colours"
    )
    texture_size: int = option(
        1024,
        group="mesh",
        label="Texture size",
        help="texture side in texels (views texture and baked field texture)",
        low=MIN_TEXTURE_SIZE,
        high=MAX_TEXTURE_SIZE,
        smoke=512,
        step=512,
    )
    keep_largest: bool = option(
        False,
        group="mesh",
        label="Drop floaters",
        help="keep only the largest connected part of the mesh (TripoSR can leave small floating blobs)",
    )
    simplify_faces: int = option(
        0,
        group="mesh",
        label="Simplify to about N faces (0 = keep all)",
        help="decimate the mesh to about this many faces (0: keep all)",
        low=4,
        high=MAX_SIMPLIFY_FACES,
        zero_allowed=True,
        flag="--simplify",
    )
    turntable: bool = option(
        False,
        group="mesh",
        label="Turntable video",
        help="write turntable.mp4: the finished mesh turning once (36 frames, 512², slight elevation)",
    )

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def smoke(cls, **changes: Any) -> GenerationSettings:
        """The smoke-mode defaults (tiny random models: 64² image, 32³ marching cubes), with `changes` applied."""
        base = cls(**{spec.name: spec.smoke_default for spec in cls.bounds().values()})
        return base.with_changes(**changes)

    @classmethod
    def defaults(cls, smoke: bool = False) -> GenerationSettings:
        """`GenerationSettings()` or, for smoke mode, `GenerationSettings.smoke()`."""
        return cls.smoke() if smoke else cls()

    def with_changes(self, **changes: Any) -> GenerationSettings:
        """A copy with `changes` applied (None values are ignored: "keep the default"). Not validated.

        Raises:
            BadInputError: an unknown option name (the message lists the known ones).
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise BadInputError(f"unknown setting(s) {unknown}; known: {sorted(known)}.")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        base: GenerationSettings | None = None,
        coerce: bool = False,
        skip: Iterable[str] = (),
    ) -> GenerationSettings:
        """Settings from a mapping of option names (None: keep `base`'s value), validated.

        Args:
            values: option name → value; keys that are not options raise `BadInputError`.
            base: the settings to start from (default: `GenerationSettings()`).
            coerce: accept UI values: whole floats (``4.0``) and numeric strings for numbers. A slider's float
                that is not whole is still an error for an integer option.
            skip: options the caller checks with its own rule (see `problems`).

        Returns:
            The validated settings.
        """
        base = base if base is not None else cls()
        changes = dict(values)
        if coerce:
            specs = cls.bounds()
            changes = {k: _coerce(specs[k], v) if k in specs else v for k, v in changes.items()}
        return base.with_changes(**changes).validate(skip=skip)

    # ------------------------------------------------------------------------------------------ checking
    def problems(self, *, skip: Iterable[str] = (), names: Mapping[str, str] | None = None) -> list[str]:
        """Every option that breaks its bounds, as one message each (empty when all are fine).

        Args:
            skip: options a caller checks with its own rule (``t2mv-multiview --scheduler ddim`` takes fewer
                steps than PeRFlow's windows).
            names: option → the name the user knows it by (a command-line flag); default: the option name.
        """
        found = []
        skip = set(skip)
        for spec in self.bounds().values():
            if spec.name in skip:
                continue
            message = _check(spec, getattr(self, spec.name), (names or {}).get(spec.name, spec.name))
            if message:
                found.append(message)
        if not {"choose", "candidates"} & skip and self.choose >= self.candidates >= 1:
            flag = (names or {}).get("choose", "choose")
            found.append(
                f"{flag} {self.choose} is out of range: with {self.candidates} candidate(s) choose 0..{self.candidates - 1}"
                ", or -1 for the best-scored one."
            )
        return found

    def validate(self, *, skip: Iterable[str] = (), names: Mapping[str, str] | None = None) -> GenerationSettings:
        """Check every option (but `skip`); return self so calls chain (``GenerationSettings(...).validate()``).

        Raises:
            BadInputError: one line naming each bad option, its value and what is allowed.
        """
        skip = tuple(skip)
        if not skip and self in _VALIDATED:
            return self  # checked once at the edge; the chain's own call costs nothing and re-checks nothing
        found = self.problems(skip=skip, names=names)
        if found:
            raise BadInputError(" ".join(found))
        if not skip:
            _VALIDATED.add(self)
        return self

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def bounds(cls) -> dict[str, OptionSpec]:
        """name → `OptionSpec` for every option, in declaration order (for sliders, ``--help`` and messages)."""
        table: dict[str, OptionSpec] = {}
        for f in fields(cls):
            meta = f.metadata["t2mv"]
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            table[f.name] = OptionSpec(
                name=f.name,
                kind=kind,
                default=f.default,
                smoke_default=meta["smoke"],
                low=meta["low"],
                high=meta["high"],
                choices=meta["choices"],
                multiple_of=meta["multiple_of"],
                zero_allowed=meta["zero_allowed"],
                group=meta["group"],
                scope=meta["scope"],
                label=meta["label"],
                help=meta["help"],
                flag=meta["flag"] or _default_flag(f.name, kind, f.default),
                step=meta["step"],
            )
        return table

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        """The `OptionSpec` of one option (KeyError for an unknown name)."""
        return cls.bounds()[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for settings.json."""
        return asdict(self)


def t2i_model_defaults(kind: str, model: str = "") -> dict[str, Any]:
    """The text-to-image options a model of `kind` brings as its own defaults (InstaFlow: 1 step, no guidance;
    PeRFlow: none, the settings' defaults are its own)."""
    from .rectified_flow import defaults_for

    if kind == "perflow":
        return {}
    own = defaults_for(kind, model)
    return {"t2i_steps": own.num_inference_steps, "t2i_guidance": own.guidance_scale}


def t2i_kind_problem(settings: GenerationSettings, kind: str, *, name: str = "t2i_steps") -> str | None:
    """One message when ``settings.t2i_steps`` is outside the bounds of a text-to-image model of `kind` (PeRFlow:
    one step per time window at least; rectified flow: 1), else None. `name`: the option as the user knows it."""
    from .rectified_flow import defaults_for

    own = defaults_for(kind, perflow_windows=T2I_TIME_WINDOWS)
    if own.min_steps <= settings.t2i_steps <= own.max_steps:
        return None
    why = " for a PeRFlow model (one step per time window)" if kind == "perflow" else ""
    return f"{name} must be an integer in [{own.min_steps}, {own.max_steps}]{why}, got {settings.t2i_steps}."


def _default_flag(name: str, kind: str, default: Any) -> str:
    dashed = name.replace("_", "-")
    if kind == "bool" and default is True:
        return f"--no-{dashed}"
    return f"--{dashed}"


def _check(spec: OptionSpec, value: Any, label: str) -> str | None:
    """One message (naming the option `label`) when `value` breaks `spec`, else None."""
    bad = f"{label} must be {spec.describe_range()}, got {value!r}."
    if spec.kind == "bool":
        return None if isinstance(value, bool) else bad
    if spec.kind == "str":
        return None if isinstance(value, str) and value in (spec.choices or (value,)) else bad
    if isinstance(value, bool):
        return bad
    if spec.kind == "int" and not isinstance(value, int):
        return bad
    if spec.kind == "float":
        if not isinstance(value, int | float) or not math.isfinite(value):
            return bad
    if spec.zero_allowed and value == 0:
        return None
    if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
        return bad
    if spec.multiple_of and value % spec.multiple_of:
        return bad
    return None


def _coerce(spec: OptionSpec, value: Any) -> Any:
    """A UI value as the option's type where that is exact (``4.0`` → 4, ``"2.5"`` → 2.5); else unchanged."""
    if value is None or isinstance(value, bool) or spec.kind in ("bool", "str"):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.kind == "float" and isinstance(value, int):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------- command line
GROUP_TITLES = {
    "seed": "seed",
    "text_to_image": "text to image",
    "preprocess": "background removal and stage inputs",
    "multiview": "multiview",
    "mesh": "mesh",
    "views": "the six views shape and texture the mesh",
}


def options_for(stages: Iterable[str], *, exclude: Iterable[str] = ()) -> list[OptionSpec]:
    """The options a command that runs `stages` uses (declaration order), but `exclude`."""
    scopes, exclude = scopes_of(stages), set(exclude)
    return [s for s in GenerationSettings.bounds().values() if s.scope in scopes and s.name not in exclude]


def add_arguments(parser: argparse.ArgumentParser, stages: Iterable[str], *, exclude: Iterable[str] = ()) -> None:
    """Add the flag of every option the `stages` use to `parser`, under headings named after the option groups.

    Every command takes its flags from here, so an option has one flag name on every command that has it
    (``--mc-resolution`` on ``t2mv text-to-mesh`` and ``t2mv-mesh`` alike), and a command shows only the options
    of the stages it runs. Every flag defaults to None ("the settings' default"), so a smoke-mode run keeps its own
    defaults; the help text shows both defaults where they differ.

    Args:
        parser: the (sub)command's parser.
        stages: the stages the command runs (a subset of `STAGES`).
        exclude: option names to leave out (an option the command fixes itself).
    """
    specs = options_for(stages, exclude=exclude)
    for group_name in GROUPS:
        in_group = [s for s in specs if s.group == group_name]
        if not in_group:
            continue
        group = parser.add_argument_group(GROUP_TITLES[group_name])
        for spec in in_group:
            _add_flag(group, spec)


def _add_flag(group: Any, spec: OptionSpec) -> None:
    default_text = f"default: {spec.default}" + (
        f"; smoke mode: {spec.smoke_default}" if spec.smoke_default != spec.default else ""
    )
    if spec.kind == "bool":
        help_text = f"do not {spec.help}" if spec.default else spec.help
        group.add_argument(spec.flag, dest=spec.name, action="store_const", const=not spec.default, help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": spec.name, "default": None}
    if spec.kind == "str":
        kwargs["choices"] = spec.choices
    else:
        kwargs["type"] = int if spec.kind == "int" else float
        kwargs["metavar"] = "N" if spec.kind == "int" else "X"
    range_text = "" if spec.kind == "str" else f"; {spec.describe_range()}"
    group.add_argument(spec.flag, help=f"{spec.help} ({default_text}{range_text})", **kwargs)


def from_namespace(
    args: argparse.Namespace,
    *,
    smoke: bool = False,
    skip: Iterable[str] = (),
    **overrides: Any,
) -> GenerationSettings:
    """The validated settings of a parsed command line (flags left unset keep the smoke or real defaults).

    Args:
        args: the namespace `add_arguments` filled (other attributes are ignored).
        smoke: start from the smoke-mode defaults.
        skip: options the caller checks with its own rule (see `GenerationSettings.problems`).
        overrides: values that win over the flags (None: ignored).

    Raises:
        BadInputError: an option out of its bounds (the message names its flag).
    """
    values = {name: getattr(args, name) for name in GenerationSettings.bounds() if hasattr(args, name)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    flags = {name: spec.flag for name, spec in GenerationSettings.bounds().items()}
    settings = GenerationSettings.defaults(smoke).with_changes(**values)
    return settings.validate(skip=skip, names=flags)


SMOKE_SETTINGS = GenerationSettings.smoke()
