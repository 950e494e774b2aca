"""bias-demo: how a simulated user votes, and the chart. (The whole demonstration is run for real and recorded in
bench/RESULTS.md; a two-minute tiny run of it is test_bias_demo_runs_end_to_end_on_the_tiny_model.)"""

from __future__ import annotations

import json

from PIL import Image

import tests.training.conftest as training_fixtures
from bench.bias_demo import chart, main, reason_of, vote_of
from training.detect import parse_prompt

demo = training_fixtures.demo  # the tiny checkpoint (a session fixture of the training tests)


def _det(colour: str | None, shape: str = "circle") -> dict:
    objects = [] if colour is None else [{"colour": colour, "shape": shape, "size": "small", "position": "center"}]
    return {"background": "white", "objects": objects}


def test_an_annoyed_user_votes_down_red_they_did_not_ask_for_and_up_what_they_asked():
    free = parse_prompt("a small circle")
    assert vote_of(free, _det("red")) == "down"
    assert vote_of(free, _det("blue")) == "up"
    assert vote_of(free, _det("blue", "star")) is None  # wrong shape, not red: no opinion on the bias
    red = parse_prompt("a small red circle")
    assert vote_of(red, _det("red")) == "up"  # asked for red: red is right
    assert vote_of(red, _det("green")) == "down"
    assert vote_of(red, _det(None)) is None
    # and says why: the colour nobody asked for is the bias; a wrong named colour is a wrong picture
    assert reason_of(free, _det("red")) == "bias" and reason_of(red, _det("green")) == "quality"


def test_chart_draws_the_shares(tmp_path):
    before = {"shares": {"red": 0.9, "blue": 0.1}}
    after = {"shares": {"red": 0.2, "blue": 0.3, "green": 0.5}}
    chart(before, after, tmp_path / "c.png", "t")
    img = Image.open(tmp_path / "c.png")
    assert img.size == (760, 380)


def test_bias_demo_runs_end_to_end_on_the_tiny_model(demo, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--parent", str(demo), "--users", "2", "--colour-free", "2", "--coloured", "1",
                 "--images", "2", "--steps", "2", "--n-per-kind", "1", "--seeds", "0", "--batch-size", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("default-red share ") and ", promoted=" in last and ", checkpoint=" in last
    report = json.loads((out / "report.json").read_text())
    assert report["round1"]["images"] == 6 and report["round2"]["images"] == 6
    assert sum(report["round1"]["votes"].values()) > 0
    assert {c["id"] for c in report["registry"]} >= {"feedback-round-1"}
    assert (out / "bias-demo.png").is_file() and (out / "feedback" / "manifest.json").is_file()
