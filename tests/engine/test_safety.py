"""The CLIP concept-embedding safety checker flags by per-concept cosine thresholds."""

import json

import numpy as np
import pytest

from engine.safety import SafetyChecker, SafetyConfigError


def _checker(tmp_path, concepts, adjustment=0.0, embed=None):
    path = tmp_path / "safety.json"
    path.write_text(json.dumps({"concepts": concepts, "adjustment": adjustment}))
    return SafetyChecker.from_file(path, embed)


def test_flags_only_concepts_over_their_threshold(tmp_path):
    checker = _checker(
        tmp_path,
        [
            {"name": "gore", "embedding": [1.0, 0.0, 0.0], "threshold": 0.9},
            {"name": "weapon", "embedding": [0.0, 2.0, 0.0], "threshold": 0.5},
        ],
    )
    images = np.array([[1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]], np.float32)
    verdicts = checker.check(images)
    assert verdicts[0].flagged and verdicts[0].concepts == ("gore",)
    assert verdicts[0].scores["gore"] == pytest.approx(1 / np.sqrt(1.01), rel=1e-5)
    assert not verdicts[1].flagged and verdicts[1].scores == {"gore": 0.0, "weapon": 0.0}
    # cosine 0.6 to gore (< 0.9), 0.8 to weapon (> 0.5): only weapon
    assert verdicts[2].concepts == ("weapon",)


def test_adjustment_moves_every_threshold(tmp_path):
    concept = [{"name": "x", "embedding": [1.0, 0.0], "threshold": 0.5}]
    image = np.array([[0.8, 0.6]], np.float32)  # cosine 0.8
    assert _checker(tmp_path, concept).check(image)[0].flagged
    assert not _checker(tmp_path, concept, adjustment=0.35).check(image)[0].flagged


def test_prompt_concepts_use_the_text_tower(tmp_path):
    calls = []

    def embed(texts):
        calls.append(texts)
        return np.array([[0.0, 1.0], [0.0, 3.0]], np.float32)

    checker = _checker(tmp_path, [{"name": "y", "prompts": ["a", "b"], "threshold": 0.1}], embed=embed)
    assert calls == [["a", "b"]]
    assert checker.check(np.array([[0.0, 1.0]]))[0].flagged


@pytest.mark.parametrize(
    "concepts, message",
    [
        ([{"threshold": 0.1, "embedding": [1]}], "needs a 'name'"),
        ([{"name": "a", "embedding": [1]}], "numeric 'threshold'"),
        ([{"name": "a", "threshold": 0.1}], "needs 'embedding' or 'prompts'"),
        ([{"name": "a", "threshold": 0.1, "prompts": ["p"]}], "CLIP text tower"),
    ],
)
def test_bad_configs_give_clear_errors(tmp_path, concepts, message):
    with pytest.raises(SafetyConfigError, match=message):
        _checker(tmp_path, concepts)


def test_disabled_checker_passes_everything():
    verdicts = SafetyChecker.disabled().check(np.ones((2, 4), np.float32))
    assert [v.flagged for v in verdicts] == [False, False]
    assert verdicts[0].scores == {}
