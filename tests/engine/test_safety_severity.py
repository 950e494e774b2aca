"""Safety severities: a critical concept's hit is marked critical (withheld whatever a guild's flagged mode says),
a mild one is not; the mark travels in the engine's JSON, and an engine that predates it reads as not critical."""

import json

import numpy as np
import pytest

from engine.api import GeneratedImage
from engine.safety import SafetyChecker, SafetyConfigError


def _checker(tmp_path, concepts):
    path = tmp_path / "safety.json"
    path.write_text(json.dumps({"concepts": concepts}))
    return SafetyChecker.from_file(path)


def test_a_critical_concept_marks_its_hits_critical_and_a_mild_one_does_not(tmp_path):
    checker = _checker(tmp_path, [
        {"name": "gore", "embedding": [1.0, 0.0], "threshold": 0.5, "severity": "critical"},
        {"name": "swimwear", "embedding": [0.0, 1.0], "threshold": 0.5},  # mild by default
    ])
    gore, swimwear, both, neither = checker.check(np.array([[1, 0.1], [0.1, 1], [1, 1], [-1, -1]], np.float32))
    assert gore.flagged and gore.critical
    assert swimwear.flagged and not swimwear.critical
    assert both.critical and set(both.concepts) == {"gore", "swimwear"}
    assert not neither.flagged and not neither.critical


def test_an_unknown_severity_is_refused_with_the_concept_named(tmp_path):
    with pytest.raises(SafetyConfigError, match=r"gore.*severity must be one of mild, critical"):
        _checker(tmp_path, [{"name": "gore", "embedding": [1.0], "threshold": 0.5, "severity": "high"}])


def test_the_critical_mark_travels_in_json_and_defaults_to_false():
    image = GeneratedImage(index=0, rank=0, png=b"png", tokens=np.arange(4, dtype=np.int16), clip_score=0.3,
                           safety={"gore": 0.9}, flagged=True, critical=True)
    data = image.to_json()
    assert data["critical"] is True and GeneratedImage.from_json(data).critical is True
    del data["critical"]  # an engine service from before severities
    assert GeneratedImage.from_json(data).critical is False
