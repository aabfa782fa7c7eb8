"""Best of N: the 3D-suitability score on constructed images, the choice and its override, the derived seeds."""

import numpy as np
import pytest
from PIL import Image

from t2mv.candidates import (
    MAX_CANDIDATES,
    candidate_seeds,
    choose,
    object_mask,
    score_images,
    score_mask,
)
from t2mv.tiny import FakeRembgSession

SIZE = 128


def disc_mask(*centres_and_radii, size=SIZE) -> np.ndarray:
    """A binary (H, W) float mask of filled discs ((row, col, radius), ...)."""
    rows, cols = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=np.float32)
    for r, c, radius in centres_and_radii:
        mask[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 1.0
    return mask


def picture(mask: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """A red object on a white (or the given) background: (H, W, 3) uint8."""
    bg = np.full((*mask.shape, 3), 255, np.uint8) if background is None else background
    return np.where(mask[..., None] > 0.5, np.array([200, 30, 30], np.uint8), bg)


CENTRED = disc_mask((64, 64, 36))


def test_a_centred_single_object_scores_high():
    score = score_mask(CENTRED, picture(CENTRED))
    assert score.score > 0.95
    assert score.weakest == "none"


def test_an_object_cut_by_the_frame_loses_to_a_centred_one():
    cut = disc_mask((64, 10, 36))  # a third of the disc lies outside the left edge
    centred, cut_score = score_mask(CENTRED, picture(CENTRED)), score_mask(cut, picture(cut))
    assert cut_score.score < 0.5 * centred.score
    assert cut_score.weakest == "framing"


def test_two_objects_lose_to_one():
    two = disc_mask((64, 34, 22), (64, 94, 22))
    score = score_mask(two, picture(two))
    assert score.score < 0.3
    assert score.weakest == "dominance"


def test_a_small_second_object_costs_less_than_an_equal_one():
    small_extra = disc_mask((64, 50, 30), (20, 110, 10))
    equal = disc_mask((64, 34, 22), (64, 94, 22))
    assert score_mask(equal).dominance < score_mask(small_extra).dominance < score_mask(CENTRED).dominance


def test_a_tiny_object_loses_to_a_sensible_one():
    tiny = disc_mask((64, 64, 4))
    score = score_mask(tiny, picture(tiny))
    assert score.score < 0.5
    assert score.weakest == "size"


def test_a_busy_background_loses_to_a_plain_one():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    busy = score_mask(CENTRED, picture(CENTRED, noise))  # the same clean mask, a busy picture around it
    assert busy.score < 0.2
    assert busy.weakest == "clean"


def test_a_soft_undecided_mask_loses_to_a_decisive_one():
    soft = np.where(CENTRED > 0, 0.55, 0.3).astype(np.float32)  # the remover was unsure everywhere
    assert score_mask(soft).clean < 0.1 < score_mask(CENTRED).clean


def test_an_empty_mask_scores_zero():
    assert score_mask(np.zeros((SIZE, SIZE), np.float32)).score == 0.0


def test_scores_through_a_background_remover_rank_the_pictures():
    """End to end through a rembg-like session: the centred object beats the cut, double, tiny and busy ones."""
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    masks = [CENTRED, disc_mask((64, 8, 36)), disc_mask((64, 34, 22), (64, 94, 22)), disc_mask((64, 64, 4))]
    images = [Image.fromarray(picture(m)) for m in masks] + [Image.fromarray(picture(CENTRED, noise))]
    scores = score_images(images, FakeRembgSession())
    assert choose(scores) == 0
    assert all(s.score < 0.5 * scores[0].score for s in scores[1:])


def test_object_mask_is_the_sessions_alpha_in_unit_range():
    image = Image.fromarray(picture(CENTRED))
    mask = object_mask(image, FakeRembgSession())
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask > 0.5, CENTRED > 0.5)


def _score(value):
    from t2mv.candidates import CandidateScore

    return CandidateScore(value, 1.0, 1.0, 1.0, 1.0, "none")


def test_choose_takes_the_best_and_the_first_of_equals():
    assert choose([_score(0.2), _score(0.9), _score(0.5)]) == 1
    assert choose([_score(0.7), _score(0.7)]) == 0


def test_choose_override_wins_and_is_checked():
    assert choose([_score(0.2), _score(0.9)], override=0) == 0
    with pytest.raises(ValueError, match="out of range"):
        choose([_score(0.2), _score(0.9)], override=2)


def test_candidate_seeds_start_at_the_seed_and_wrap():
    assert candidate_seeds(42, 3) == [42, 43, 44]
    assert candidate_seeds(2**32 - 1, 2) == [2**32 - 1, 0]
    for bad in (0, MAX_CANDIDATES + 1):
        with pytest.raises(ValueError):
            candidate_seeds(0, bad)


def test_settings_bound_candidates_and_choose():
    from t2mv.errors import BadInputError
    from t2mv.settings import GenerationSettings

    assert (GenerationSettings().candidates, GenerationSettings().choose) == (1, -1)  # one image, automatic choice
    GenerationSettings(candidates=MAX_CANDIDATES, choose=MAX_CANDIDATES - 1).validate()
    with pytest.raises(BadInputError, match="choose 2 is out of range: with 2 candidate"):
        GenerationSettings(candidates=2, choose=2).validate()
    with pytest.raises(BadInputError, match="candidates must be"):
        GenerationSettings(candidates=MAX_CANDIDATES + 1).validate()


# ------------------------------------------------------------------------------------------------ in the chain
@pytest.fixture(scope="module")
def t2i_chain(one_thread):
    from t2mv.chain import TextTo3D

    return TextTo3D.tiny(0, stages=("text_to_image",))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_chain_writes_n_candidates_and_the_chosen_image(t2i_chain, tmp_path):
    import json

    from t2mv.settings import GenerationSettings

    result = t2i_chain(
        "a red chair", settings=GenerationSettings.smoke(seed=5, candidates=3, choose=2), output_dir=tmp_path
    )
    assert [p.name for p in sorted(tmp_path.glob("candidate_*.png"))] == [f"candidate_{k}.png" for k in range(3)]
    np.testing.assert_array_equal(_pixels(tmp_path / "image.png"), _pixels(tmp_path / "candidate_2.png"))
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert (settings["candidates"], settings["chosen"], settings["chosen_by"]) == (3, 2, "choose")
    assert settings["candidate_seeds"] == [5, 6, 7]
    info = json.loads((tmp_path / "info.json").read_text())
    assert len(info["candidate_scores"]) == 3 and {"score", "framing", "weakest"} <= set(info["candidate_scores"][0])
    assert result.chosen == 2 and result.image is result.candidates[2]
    # Candidate 2 is reproduced alone from its seed (5 + 2).
    alone = t2i_chain("a red chair", settings=GenerationSettings.smoke(seed=7), output_dir=tmp_path / "alone")
    assert not list((tmp_path / "alone").glob("candidate_*"))  # one image: no candidate files
    assert np.abs(np.asarray(alone.image, np.int16) - _pixels(tmp_path / "candidate_2.png")).max() <= 2


def test_given_candidates_are_scored_without_making_images_again(t2i_chain, tmp_path):
    """The app's "Make 3D" path: earlier candidates go in, the best-scored (the centred object) is chosen."""
    from t2mv.settings import GenerationSettings

    cut, centred = disc_mask((64, 6, 36)), CENTRED
    given = [Image.fromarray(picture(cut)), Image.fromarray(picture(centred))]
    result = t2i_chain("a red ball", candidates=given, settings=GenerationSettings.smoke(), output_dir=tmp_path)
    assert result.chosen == 1 and result.settings["chosen_by"] == "score"
    assert "text_to_image" not in result.timings  # nothing generated
    assert result.candidate_scores[1]["score"] > result.candidate_scores[0]["score"]
    np.testing.assert_array_equal(_pixels(tmp_path / "image.png"), picture(centred))
    assert (tmp_path / "candidate_0.png").is_file() and result.settings["candidates"] == 2
    picked = t2i_chain("a red ball", candidates=given, settings=GenerationSettings.smoke(choose=0))
    assert picked.chosen == 0 and picked.settings["chosen_by"] == "choose"


def test_bad_candidate_requests_are_refused_before_anything_runs(t2i_chain, tmp_path):
    from t2mv.errors import BadInputError
    from t2mv.settings import GenerationSettings

    image = Image.fromarray(picture(CENTRED))
    with pytest.raises(BadInputError, match="not both"):
        t2i_chain("a ball", image=image, candidates=[image])
    with pytest.raises(BadInputError, match="choose 3 is out of range"):
        t2i_chain("a ball", settings=GenerationSettings.smoke(candidates=3, choose=3), output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_text_only_run_scores_its_candidates_with_the_chains_background_remover():
    """`t2mv image --candidates N` (no 3D stage) must cut the same masks as text-to-mesh: the chain's session (u2net
    for real weights), not the weightless fallback, so both commands choose the same candidate for a seed."""
    from t2mv.chain import TextTo3D
    from t2mv.settings import GenerationSettings
    from t2mv.tiny import FakeRembgSession

    calls = []

    class Recording(FakeRembgSession):
        def predict(self, img, *args, **kwargs):
            calls.append(img.size)
            return super().predict(img, *args, **kwargs)

    chain = TextTo3D.tiny(0, stages=("text_to_image",))
    chain._rembg_session = Recording()
    settings = GenerationSettings.smoke(seed=3, candidates=2)
    assert chain.needs_background_removal(None, settings, multiview=False, mesh=False)
    assert not chain.needs_background_removal(None, settings.with_changes(candidates=1), multiview=False, mesh=False)
    assert not chain.needs_background_removal(
        None, settings.with_changes(remove_background=False), multiview=False, mesh=False
    )
    chain("a red chair", settings=settings)
    assert len(calls) == 2  # each candidate's mask came from the chain's own session
