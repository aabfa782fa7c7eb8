"""GenerationSettings: defaults and bounds from the stages' own constants, one validation, flags and sliders from it."""

import argparse
import math

import pytest

from t2mv.errors import BadInputError
from t2mv.settings import (
    MAX_SEED,
    MV_TIME_WINDOWS,
    STAGES,
    T2I_TIME_WINDOWS,
    GenerationSettings,
    add_arguments,
    from_namespace,
    scopes_of,
)


def test_bounds_come_from_the_stages_constants():
    from t2mv.text_to_image import CHAIN_PRESET, PERFLOW_SD15_SCHEDULER
    from triposr import mesh, texture
    from wonder3d_perflow.pipeline import TRAINED_TIME_WINDOWS

    b = GenerationSettings.bounds()
    assert MV_TIME_WINDOWS == TRAINED_TIME_WINDOWS and b["mv_steps"].low == TRAINED_TIME_WINDOWS
    # t2i steps: 1..100 for every kind; PeRFlow's one step per time window is `t2i_kind_problem`'s bound
    assert T2I_TIME_WINDOWS == PERFLOW_SD15_SCHEDULER["num_time_windows"] and b["t2i_steps"].low == 1
    # The marching-cubes range is triposr.mesh's, intersected with the chain's (issue 11, item 5: three ranges).
    assert mesh.MIN_RESOLUTION <= b["mc_resolution"].low and b["mc_resolution"].high <= mesh.MAX_RESOLUTION
    assert (b["mc_resolution"].low, b["mc_resolution"].high) == (32, 512)
    assert (b["texture_size"].low, b["texture_size"].high) == (texture.MIN_TEXTURE_SIZE, texture.MAX_TEXTURE_SIZE)
    assert (b["seed"].low, b["seed"].high) == (0, 2**32 - 1) == (0, MAX_SEED)
    d = GenerationSettings()
    assert (d.t2i_steps, d.t2i_guidance) == (CHAIN_PRESET["num_inference_steps"], CHAIN_PRESET["guidance_scale"])
    assert d.validate() is d and GenerationSettings.smoke().validate().height == 64


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"t2i_steps": 0}, r"t2i_steps must be an integer in \[1, 100\], got 0"),
        ({"mv_steps": 2}, r"mv_steps must be an integer in \[4, 100\]"),  # was accepted, failed after t2i ran
        ({"mc_threshold": math.nan}, "mc_threshold must be a finite number"),
        ({"mc_threshold": math.inf}, "mc_threshold"),
        ({"mv_guidance": math.nan}, "mv_guidance"),
        ({"mv_guidance": 0.5}, r"mv_guidance must be a finite number in \[1, 30\]"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 4294967295\]"),
        ({"seed": -5}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"mc_resolution": 1024}, "mc_resolution"),
        ({"height": 100}, "multiple of 8"),
        ({"texture_size": 16}, "texture_size"),
        ({"simplify_faces": 2}, r"simplify_faces must be 0 or an integer in \[4, 10000000\]"),
        ({"mv_preprocess": "center"}, "mv_preprocess must be one of 'wonder3d', 'perflow'"),
        ({"remove_background": "yes"}, "remove_background must be true or false"),
        ({"mesh_foreground_ratio": 1.5}, "mesh_foreground_ratio"),
    ],
)
def test_bad_values_are_one_line_naming_the_option_and_the_range(changes, match):
    settings = GenerationSettings().with_changes(**changes)
    with pytest.raises(BadInputError, match=match) as info:
        settings.validate()
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_t2i_steps_are_bounded_by_the_model_kind():
    from t2mv.settings import t2i_kind_problem, t2i_model_defaults

    two = GenerationSettings(t2i_steps=2)
    assert "t2i_steps must be an integer in [4, 100] for a PeRFlow model" in t2i_kind_problem(two, "perflow")
    assert t2i_kind_problem(two, "rectified_flow") is None
    assert t2i_kind_problem(GenerationSettings(t2i_steps=4), "perflow") is None
    instaflow = t2i_model_defaults("rectified_flow", "XCLiu/instaflow_0_9B_from_sd_1_5")
    assert instaflow == {"t2i_steps": 1, "t2i_guidance": 0.0} and t2i_model_defaults("perflow") == {}


def test_several_problems_in_one_message_and_unknown_names():
    with pytest.raises(BadInputError) as info:
        GenerationSettings(seed=-1, mv_steps=1).validate()
    assert "seed" in str(info.value) and "mv_steps" in str(info.value)
    with pytest.raises(BadInputError, match="unknown setting"):
        GenerationSettings().with_changes(mc_resolutoin=64)
    assert GenerationSettings().with_changes(seed=None).seed == 0  # None keeps the value


def test_ui_values_are_coerced_only_when_exact():
    s = GenerationSettings.from_mapping({"t2i_steps": 6.0, "seed": "7", "mv_guidance": 2}, coerce=True)
    assert (s.t2i_steps, s.seed, s.mv_guidance) == (6, 7, 2.0)
    assert isinstance(s.t2i_steps, int) and isinstance(s.mv_guidance, float)
    with pytest.raises(BadInputError, match="t2i_steps"):
        GenerationSettings.from_mapping({"t2i_steps": 6.5}, coerce=True)
    with pytest.raises(BadInputError, match="seed"):
        GenerationSettings.from_mapping({"seed": "seven"}, coerce=True)


def test_flags_and_help_are_generated_from_the_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ("multiview",))
    text = " ".join(parser.format_help().split())
    assert "--mv-steps N" in text and "--mv-preprocess" in text and "--seed N" in text
    assert "--mc-resolution" not in text and "--mesh-foreground-ratio" not in text and "--t2i-steps" not in text
    parser = argparse.ArgumentParser()
    add_arguments(parser, ("mesh",))
    text = " ".join(parser.format_help().split())
    assert "(default: 256; smoke mode: 32; an integer in [32, 512])" in text
    assert "--seed" not in text and "--mv-steps" not in text  # TripoSR draws no noise: no seed to set
    args = parser.parse_args(["--mc-resolution", "64", "--bake-texture"])
    s = from_namespace(args, smoke=True)
    assert (s.mc_resolution, s.bake_texture, s.texture_size) == (64, True, 512)  # unset flags keep smoke defaults
    with pytest.raises(BadInputError, match=r"--mc-resolution must be an integer in \[32, 512\], got 16"):
        from_namespace(parser.parse_args(["--mc-resolution", "16"]))


@pytest.mark.parametrize(
    "stages, expected",
    [
        (("text_to_image",), {"seed", "t2i_steps", "t2i_guidance", "height", "width"}),
        (("multiview",), {"seed", "remove_background", "mv_preprocess", "mv_foreground_ratio", "mv_steps"}),
        (("mesh",), {"remove_background", "mesh_foreground_ratio", "mc_resolution", "bake_texture", "simplify_faces"}),
        (("multiview", "mesh"), {"texture_source", "refine", "mv_steps", "mc_threshold", "mesh_foreground_ratio"}),
    ],
)
def test_a_command_gets_exactly_the_options_of_its_stages(stages, expected):
    from t2mv.settings import options_for

    names = {spec.name for spec in options_for(stages)}
    assert expected <= names
    # Hand-written ownership: which stage each option needs (the views' options need both image stages).
    owner = {
        "seed": {"text_to_image", "multiview"},
        "t2i_steps": {"text_to_image"},
        "mv_foreground_ratio": {"multiview"},
        "mv_preprocess": {"multiview"},
        "mesh_foreground_ratio": {"mesh"},
        "remove_background": {"multiview", "mesh"},
        "mc_resolution": {"mesh"},
        "texture_size": {"mesh"},
    }
    for name, needs in owner.items():
        assert (name in names) == bool(needs & set(stages)), (name, stages)
    assert ("texture_source" in names) == ({"multiview", "mesh"} <= set(stages))


def test_to_dict_round_trips():
    s = GenerationSettings.smoke(seed=3, bake_texture=True)
    assert GenerationSettings(**s.to_dict()) == s and s.to_dict()["seed"] == 3


def test_validated_once_then_never_rechecked(monkeypatch):
    checked = GenerationSettings.smoke(seed=5).validate()
    calls = []
    monkeypatch.setattr(GenerationSettings, "problems", lambda self, **kwargs: calls.append(self.seed) or [])
    checked.validate()  # what the chain does with settings the CLI or app already checked
    assert calls == []
    checked.with_changes(seed=987_654).validate()  # changed settings are checked again
    assert calls == [987_654]


def test_importing_the_package_keeps_diffusers_away_from_jax():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "USE_FLAX"}
    code = "import t2mv.text_to_image, diffusers.utils.import_utils as u; print(u.USE_JAX)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr


# ---------------------------------------------------------------------------------------------- mutation survivors
# Each test below fails on a change mutmut made to t2mv/settings.py that the tests above let through
# (benchmarks/results/mutation/settings.json).
def _actions(stages=STAGES, **kwargs):
    parser = argparse.ArgumentParser()
    add_arguments(parser, stages, **kwargs)
    return parser, {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_flag_has_its_dest_help_type_and_choices():
    parser, actions = _actions()
    specs = GenerationSettings.bounds()
    assert {spec.flag for spec in specs.values()} == set(actions)
    for spec in specs.values():
        action = actions[spec.flag]
        assert action.dest == spec.name and action.default is None, spec.name
        default_text = f"default: {spec.default}"
        if spec.smoke_default != spec.default:
            default_text += f"; smoke mode: {spec.smoke_default}"
        if spec.kind == "bool":  # a flag flips the default: its help says what the flag does
            assert action.const is (not spec.default)
            assert action.help == (f"do not {spec.help}" if spec.default else spec.help), spec.name
        elif spec.kind == "str":
            assert action.choices == spec.choices and action.help == f"{spec.help} ({default_text})", spec.name
        else:
            assert action.type is {"int": int, "float": float}[spec.kind], spec.name
            assert action.metavar == {"int": "N", "float": "X"}[spec.kind], spec.name
            assert action.help == f"{spec.help} ({default_text}; {spec.describe_range()})", spec.name
    assert (
        actions["--no-remove-bg"].help
        == "do not cut the object out with rembg (u2net) when the image has no transparency"
    )
    assert "smoke mode" not in actions["--mv-preprocess"].help  # same default in both modes: said once
    args = parser.parse_args(["--no-remove-bg", "--refine", "--mv-preprocess", "perflow"])
    assert (args.remove_background, args.refine, args.mv_preprocess) == (False, True, "perflow")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mv-preprocess", "crop"])
    titles = {group.title for group in parser._action_groups}
    assert {"seed", "text to image", "multiview", "mesh", "the six views shape and texture the mesh"} <= titles
    assert "--seed" not in _actions(exclude=("seed",))[1]


def test_from_namespace_defaults_overrides_and_skip():
    parser, _ = _actions()
    args = parser.parse_args([])
    assert (
        from_namespace(args) == GenerationSettings() and from_namespace(args, smoke=True) == GenerationSettings.smoke()
    )
    assert from_namespace(args, seed=5, mv_steps=None).seed == 5
    bad = parser.parse_args(["--mv-steps", "1"])  # below PeRFlow's windows: a caller with its own rule skips it
    with pytest.raises(BadInputError, match="--mv-steps"):
        from_namespace(bad)
    assert from_namespace(bad, skip=("mv_steps",)).mv_steps == 1


def test_problems_choose_against_candidates_and_skip():
    message = "choose 3 is out of range: with 3 candidate(s) choose 0..2, or -1 for the best-scored one."
    assert GenerationSettings(candidates=3, choose=3).problems() == [message]
    assert GenerationSettings(candidates=3, choose=4).problems(names={"choose": "--choose"}) == [
        "--" + message.replace("3 is", "4 is")
    ]
    assert GenerationSettings(candidates=1, choose=1).problems() == [message.replace("3", "1").replace("0..2", "0..0")]
    assert GenerationSettings(candidates=3, choose=2).problems() == []
    for skip in (("choose",), ("candidates",)):
        assert GenerationSettings(candidates=3, choose=3).problems(skip=skip) == []
    # A skipped option is passed over, the ones after it are still checked; several problems, one line.
    both = GenerationSettings(seed=-1, mc_resolution=1, mv_steps=1)
    assert len(both.problems(skip=("seed",))) == 2 and len(both.problems()) == 3
    with pytest.raises(BadInputError) as info:
        both.validate()
    assert str(info.value) == " ".join(both.problems())
    assert GenerationSettings(mv_steps=1).validate(skip=("mv_steps",)).mv_steps == 1


def test_bounds_are_inclusive_and_described_in_words():
    specs = GenerationSettings.bounds()
    for spec in specs.values():
        if spec.kind in ("int", "float") and spec.high is not None and not spec.multiple_of:
            extra = {"candidates": specs["candidates"].high} if spec.name == "choose" else {}  # choose < candidates
            assert GenerationSettings(**{spec.name: spec.high}, **extra).problems() == [], spec.name
    ratio = specs["mv_foreground_ratio"]
    assert (ratio.label, ratio.help, ratio.step) == (
        "Foreground ratio (multiview)",
        "object size in the multiview input (wonder3d preprocessing)",
        0.05,
    )
    assert ratio.describe_range() == "a finite number in [0.3, 1]"
    assert specs["height"].describe_range() == "an integer in [64, 1024], a multiple of 8"
    assert specs["upscale"].describe_range() == "0 or an integer in [128, 2048], a multiple of 64"
    assert scopes_of(STAGES) == {*STAGES, "diffusion", "preprocess", "views"}
    with pytest.raises(AssertionError, match="subset"):
        scopes_of(["texture"])


def test_defaults_and_from_mapping_base_and_coercion():
    assert GenerationSettings.defaults() == GenerationSettings() != GenerationSettings.smoke()
    assert GenerationSettings.from_mapping({}, base=GenerationSettings.smoke()) == GenerationSettings.smoke()
    with pytest.raises(BadInputError):  # no coercion unless asked: 4.0 is not an integer
        GenerationSettings.from_mapping({"t2i_steps": 4.0})
    steps = GenerationSettings.from_mapping({"t2i_steps": 5, "mv_guidance": 2}, coerce=True)
    assert type(steps.t2i_steps) is int and type(steps.mv_guidance) is float
    with pytest.raises(BadInputError, match="not_an_option"):
        GenerationSettings.from_mapping({"not_an_option": 1}, coerce=True)
    # A bool or a string is not read as a number for a number option, nor a numeric string for a text or switch.
    with pytest.raises(BadInputError, match="got True"):
        GenerationSettings.from_mapping({"mv_guidance": True}, coerce=True)
    with pytest.raises(BadInputError, match="got '1'"):
        GenerationSettings.from_mapping({"texture_source": "1"}, coerce=True)
    with pytest.raises(BadInputError, match="got '1'"):
        GenerationSettings.from_mapping({"refine": "1"}, coerce=True)
