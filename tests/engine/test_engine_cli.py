"""python -m engine inspect / generate."""

import json

import pytest
from PIL import Image

from engine.__main__ import main
from training.fixtures import random_checkpoint


@pytest.mark.parametrize(
    "target, total", [("mini", "437,833,712"), ("mega", "2,587,521,024"), ("clip-b32", "151,277,313")]
)
def test_inspect_presets_count_without_allocating(capsys, target, total):
    assert main(["inspect", target]) == 0
    out = capsys.readouterr().out
    assert f"all parts: {total} params" in out


def test_inspect_unknown_target_is_a_clear_error(capsys):
    assert main(["inspect", "no-such-thing"]) == 2
    assert "neither a preset" in capsys.readouterr().out


def test_generate_writes_images_grid_and_result(tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--n", "3", "--seed", "7", "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 7 and result["checkpoint"] == "random-0" and result["attention"] in ("xla", "native")
    assert [im["rank"] for im in result["images"]] == [0, 1, 2]
    assert sorted(im["index"] for im in result["images"]) == [0, 1, 2]
    scores = [im["clip_score"] for im in result["images"]]
    assert scores == sorted(scores, reverse=True)
    for im in result["images"]:
        assert (out / im["file"]).is_file() and im["seed"] == 7 and isinstance(im["flagged"], bool)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > Image.open(out / result["images"][0]["file"]).size[0]
    assert "grid.png" in capsys.readouterr().out
    # same seed, same images
    out2 = tmp_path / "out2"
    assert main(["generate", "a red circle", "--n", "3", "--seed", "7", "--checkpoint", str(ckpt),
                 "--out", str(out2)]) == 0
    for im in result["images"]:
        assert (out / im["file"]).read_bytes() == (out2 / im["file"]).read_bytes()
    # bad input: clear error, exit 2
    assert main(["generate", "   ", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "non-empty" in capsys.readouterr().out
