"""The work-in-progress checkpoints in training/wip are notes: each ``checkpoint.json`` says how to rebuild its
weights (which are not in git) with command lines that the current ``python -m training`` still accepts."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from training.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[2]
WIP = ROOT / "training" / "wip"
CHECKPOINTS = sorted(p.parent.name for p in WIP.glob("*/checkpoint.json"))
TRAINING = [".venv/bin/python", "-m", "training"]
INPUT_FLAGS = ("--init-from", "--vqgan", "--shards", "--eval-shards", "--checkpoint", "--tokenizer",
               "--clip-tokenizer", "--vqgan-roundtrip")


def _meta(name: str) -> dict:
    return json.loads((WIP / name / "checkpoint.json").read_text())


def _inputs_and_outputs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Paths a step reads and paths it writes."""
    if argv[:3] == TRAINING:
        args = build_parser().parse_args(argv[3:])
        inputs = [str(getattr(args, f[2:].replace("-", "_"), None) or "") for f in INPUT_FLAGS]
        outputs = [str(p) for p in (getattr(args, "out", None), getattr(args, "to", None)) if p is not None]
        return [p for p in inputs if p], outputs
    if argv[:2] == ["ln", "-s"] and len(argv) == 4:
        return [_normalise(Path(argv[3]).parent / argv[2])], [argv[3]]  # a relative link's target
    if argv[0] == "cp" and len(argv) == 3:
        return [argv[1]], [argv[2]]
    raise AssertionError(f"unexpected command: {shlex.join(argv)}")


def _normalise(path: Path) -> str:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def _produced(name: str) -> set[str]:
    meta = _meta(name)
    made: set[str] = set()
    for required in meta["requires"]:
        made |= _produced(required)
    for step in meta["recipe"]:
        made |= set(_inputs_and_outputs(shlex.split(step["command"]))[1])
    return made


def test_there_are_wip_checkpoints():
    assert CHECKPOINTS == ["shapes-demo-next", "shapes-demo-wip"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_json_says_what_it_is_and_where_the_weights_are(name):
    meta = _meta(name)
    assert meta["id"].startswith(name)
    assert meta["status"] and meta["sampling"]["condition_scale"] > 0
    assert "git archive" in meta["weights"] and f"training/wip/{name}" in meta["weights"]
    assert set(meta["requires"]) <= set(CHECKPOINTS) - {name}
    assert meta["eval"]["n_prompts"] > 0


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_recipe_step_is_a_command_line_the_cli_accepts(name):
    for step in _meta(name)["recipe"]:
        assert set(step) <= {"command", "note"}
        _inputs_and_outputs(shlex.split(step["command"]))  # argparse exits on a flag it does not know


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_input_path_is_made_by_an_earlier_step_or_a_required_recipe(name):
    meta = _meta(name)
    made: set[str] = set()
    for required in meta["requires"]:
        made |= _produced(required)
    for step in meta["recipe"]:
        inputs, outputs = _inputs_and_outputs(shlex.split(step["command"]))
        for path in inputs:
            made_here = (path in made or any(m.startswith(path + "/") for m in made)  # a dir of made parts
                         or (not path.startswith("training/wip/") and (ROOT / path).is_file()))  # in the repo
            assert made_here, f"{name}: {step['command']!r} reads {path}, which no earlier step makes"
        made |= set(outputs)
    checkpoint_dir = f"training/wip/{name}"
    for part in ("vqgan", "dallebart", "clip", "safety.json"):
        assert f"{checkpoint_dir}/{part}" in made, f"{name}: the recipe does not make {part}"


def test_only_notes_are_tracked_under_training_wip():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "training/wip"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "training/wip has no tracked notes"
    assert all(p.endswith((".md", "/checkpoint.json")) for p in tracked), tracked


def test_gitignore_keeps_weights_out_of_training_wip():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("training/wip/shapes-demo-wip/dallebart/flax_model.msgpack",
                 "training/wip/shapes-demo-next/eval/report.json", "training/wip/new-run/vqgan/config.json"):
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0, path
    for path in ("training/wip/README.md", "training/wip/shapes-demo-wip/checkpoint.json"):
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 1, path
