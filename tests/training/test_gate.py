"""The promotion gate: bias and colour adherence measured exactly on fake pipelines that draw dataset images, and
the decision accepts and rejects the right candidates (small synthetic metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import GeneratedImage, GenerationResult
from engine.pipeline import png_bytes
from training.data.captions import COLOUR_NAMES
from training.data.shapes import POSITION_OFFSET, POSITION_VECTORS, SIZE_FRACTION, render_scene
from training.detect import parse_prompt
from training.gate import GatePolicy, decide, interval, measure


class ColourPipeline:
    """Draws the one object a prompt names; colour-free prompts get ``free(i)`` for candidate i, coloured ones
    their colour, or with ``shift`` the next palette colour (a model that lost the named colours)."""

    batch_buckets = (8,)
    checkpoint_id = "fake"

    def __init__(self, free, shift: bool = False):
        self.free, self.shift = free, shift

    def generate(self, requests):
        out = []
        for r in requests:
            named = parse_prompt(r.prompt)
            images = []
            for i in range(r.n):
                objs = named["objects"]
                spec = {"background": "white", "objects": []}
                if len(objs) == 1:
                    o = objs[0]
                    colour = o["colour"] or self.free(i)
                    if o["colour"] and self.shift:
                        colour = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 1) % len(COLOUR_NAMES)]
                    vx, vy = POSITION_VECTORS[o["position"] or "center"]
                    spec["background"] = named.get("background") or ("black" if colour == "white" else "white")
                    spec["objects"] = [{"shape": o["shape"], "colour": colour, "size": o["size"] or "small",
                                        "extent": SIZE_FRACTION[o["size"] or "small"],
                                        "center": [0.5 + vx * POSITION_OFFSET, 0.5 + vy * POSITION_OFFSET]}]
                png = png_bytes(render_scene(spec, 64, supersample=2))
                images.append(GeneratedImage(index=i, rank=i, png=png, tokens=np.zeros(4, np.int16),
                                             clip_score=-float(i), safety={}, flagged=False))
            out.append(GenerationResult(request_id=r.request_id, prompt=r.prompt, seed=r.seed, images=images,
                                        checkpoint_id=self.checkpoint_id))
        return out


def test_bias_and_colour_adherence_are_measured_exactly():
    drawable = [c for c in COLOUR_NAMES if c != "white"]
    biased = measure(ColourPipeline(lambda i: "red"), seeds=(0,), n_per_kind=2, candidates=7)
    fair = measure(ColourPipeline(lambda i: drawable[i % len(drawable)]), seeds=(0,), n_per_kind=2, candidates=7)
    lost = measure(ColourPipeline(lambda i: drawable[i % len(drawable)], shift=True), seeds=(0, 1),
                   n_per_kind=2, candidates=7)
    assert biased["bias_share"]["mean"] == 1.0 and biased["shares"]["red"] == 1.0
    assert biased["tv_to_uniform"]["mean"] == pytest.approx(1 - 1 / len(COLOUR_NAMES))
    assert fair["bias_share"]["mean"] == pytest.approx(1 / 7)
    assert fair["tv_to_uniform"]["mean"] == pytest.approx(1 / len(COLOUR_NAMES))  # white never drawn
    assert biased["colour_adherence"]["mean"] == fair["colour_adherence"]["mean"] == 1.0
    assert lost["bias_share"]["mean"] == pytest.approx(1 / 7)
    adherence = lost["colour_adherence"]
    assert adherence["n"] == 2 and adherence["mean"] < 0.5  # prompts that name a colour do not get it
    assert biased["fidelity"]["n"] == 1
    assert biased["none_share"]["mean"] == fair["none_share"]["mean"] == 0.0  # every candidate drew its object


def _metrics(bias: float, tv: float, fidelity: float, adherence: float = 0.9, blank: float = 0.01) -> dict:
    return {"bias_share": interval([bias]), "tv_to_uniform": interval([tv]), "fidelity": interval([fidelity]),
            "colour_adherence": interval([adherence]), "none_share": interval([blank])}


PARENT = _metrics(0.9, 0.78, 0.45)


@pytest.mark.parametrize(("candidate", "kl", "promote", "failed"), [
    (_metrics(0.2, 0.15, 0.44), 12.0, True, []),
    (_metrics(0.2, 0.15, 0.43), 12.0, True, []),  # exactly 2 points down is allowed
    (_metrics(0.2, 0.15, 0.42), 12.0, False, ["fidelity kept"]),
    (_metrics(0.9, 0.70, 0.50), 12.0, False, ["bias falls"]),  # the red share did not fall
    (_metrics(0.5, 0.80, 0.50), 12.0, False, ["bias falls"]),  # another colour took over: no nearer uniform
    (_metrics(0.0, 0.20, 0.45, adherence=0.6), 12.0, False, ["named colours kept"]),  # never draws red again
    (_metrics(0.2, 0.15, 0.45, blank=0.03), 12.0, True, []),  # 2 points more blank images is allowed
    (_metrics(0.5, 0.5, 0.45, blank=0.16), 12.0, False, ["objects still drawn"]),  # red fell by drawing nothing
    (_metrics(0.2, 0.15, 0.45), 80.0, False, ["KL to parent within budget"]),
    (_metrics(0.2, 0.15, 0.45), None, False, ["KL to parent within budget"]),
])
def test_gate_accepts_and_rejects_the_right_candidates(candidate, kl, promote, failed):
    verdict = decide(PARENT, candidate, kl, GatePolicy(kl_budget=50.0))
    assert verdict["promote"] is promote
    assert [c["name"] for c in verdict["checks"] if not c["pass"]] == failed
    assert len(verdict["checks"]) == 5 and all(c["detail"] for c in verdict["checks"])


def test_the_blank_share_of_metrics_measured_before_it_was_summarised_comes_from_the_seeds():
    old = {k: v for k, v in PARENT.items() if k != "none_share"}
    old["per_seed"] = [{"none_share": 0.0}, {"none_share": 0.02}]
    verdict = decide(old, _metrics(0.2, 0.15, 0.45, blank=0.2), 12.0)
    blank = next(c for c in verdict["checks"] if c["name"] == "objects still drawn")
    assert blank["parent"] == pytest.approx(0.01) and not blank["pass"]


def test_interval_over_seeds():
    one = interval([0.3])
    assert one["low"] == one["high"] == one["mean"] == 0.3
    two = interval([0.1, 0.3])
    assert two["mean"] == pytest.approx(0.2) and two["n"] == 2
    assert two["high"] - two["mean"] == pytest.approx(12.706 * 0.1, rel=1e-3)  # t(0.975, 1) * sd / sqrt(2)
    assert interval([])["mean"] is None


def test_a_gate_report_summarises_a_measurement_cached_before_the_blank_share_was():
    from training.retrain import _brief

    old = {**{k: v for k, v in PARENT.items() if k != "none_share"}, "fidelity_mean_candidate": interval([0.3]),
           "dominant_share": interval([0.9]), "shares": {"red": 0.9}, "seeds": [0, 1],
           "per_seed": [{"none_share": 0.0}, {"none_share": 0.1}]}
    brief = _brief(old)
    assert brief["none_share"]["mean"] == pytest.approx(0.05) and brief["none_share"]["n"] == 2
    assert brief["fidelity"] == old["fidelity"]
