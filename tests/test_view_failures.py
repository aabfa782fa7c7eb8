"""benchmarks.view_failures: the broken views are broken as named, and the stage's answers are recorded (small preset).

Broken code this catches: a case that does not change the views (the backdrop cases would then equal the baseline
for the wrong reason: the changed view is checked), a kept backdrop painted on the mesh, noise views textured, and a
record that loses what the stage said."""

import json

import numpy as np
import pytest

from benchmarks import view_failures as vf
from benchmarks import view_scenes as vs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gear():
    return vs.make_case("gear", preset="small")


def test_cases_break_the_views_as_named(gear):
    colors, normals = vf._views(gear, "grey-backdrop", 0)
    for new, old in ((colors, gear.colors), (normals, gear.normals)):
        white = (np.asarray(old[vf.BACK]) >= 250).all(-1)
        assert white.mean() > 0.3 and (np.asarray(new[vf.BACK])[white] == vf.GREY).all()
    colors, normals = vf._views(gear, "ramp-backdrop", 0)
    ramp = np.asarray(colors[vf.BACK])[..., 0]
    assert ramp[0, 0] == 200 and ramp[0, -1] == 250 and normals[vf.BACK] is gear.normals[vf.BACK]
    assert all(c is o for k, (c, o) in enumerate(zip(colors, gear.colors)) if k != vf.BACK)
    colors, _ = vf._views(gear, "zoomed", 0)
    grown = (np.asarray(colors[0]) < 250).any(-1).sum() / (np.asarray(gear.colors[0]) < 250).any(-1).sum()
    assert grown == pytest.approx(vf.ZOOM**2, rel=0.1)
    colors, normals = vf._views(gear, "noise", 0)
    assert np.asarray(colors[0]).std() > 60 and np.asarray(normals[5]).std() > 60
    with pytest.raises(ValueError, match="unknown case"):
        vf._views(gear, "nonsense", 0)


def test_small_run_records_what_the_stage_did(tmp_path, gear):
    out = tmp_path / "vf.json"
    argv = ["--preset", "small", "--objects", "gear", "--cases", "baseline,ramp-backdrop-both,noise", "--out", str(out),
            "--threads", "1"]  # fmt: skip
    assert vf.main(argv) == 0
    cases = json.loads(out.read_text())["objects"]["gear"]["cases"]
    base, both, noise = cases["baseline"], cases["ramp-backdrop-both"], cases["noise"]
    assert base["textured"] and base["texture_gain_db"] > 1.0 and all(base["texture_views_used"])
    # The back view kept its backdrop in both maps: left out with a note, the rest of the texture as good.
    assert both["texture_views_used"] == [True, True, True, False, True, True]
    assert any("'back' is left out" in w for w in both["warnings"])
    assert both["texture_gain_db"] > base["texture_gain_db"] - 0.5
    # Noise views texture nothing: the mesh keeps its field colours, and the stage says why.
    assert not noise["textured"] and noise["texture_gain_db"] == 0.0
    assert any("no view has a silhouette" in w for w in noise["warnings"])
    assert vf.main(["--cases", "nonsense", "--preset", "small"]) == 2
    other = json.loads(out.read_text())
    other["objects"] = {"mug": other["objects"]["gear"]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert vf.main(["--merge", str(out), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert list(merged["objects"]) == ["gear", "mug"] and [r["objects"] for r in merged["runs"]] == [["gear"], ["mug"]]
    assert vf.main(["--merge", str(out)]) == 2
