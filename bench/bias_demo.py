"""``python -m bench bias_demo --out DIR`` (also ``python -m training bias-demo``): users' feedback removes the
demo model's red bias, end to end.

Simulated users send colour-free and coloured prompts through the real bot service (:class:`GenerationService`)
and database (SQLite in ``DIR``) with the real model in process. Each votes on every image of their own result
like a person annoyed by the bias: 👎 on a red image they did not ask red for (reason ``bias``), 👍 on an image
that shows what they asked; for a colour they named, 👎 on another colour (reason ``quality``). Then, each as
its own process, as an admin would: ``python -m training feedback export`` → ``finetune`` (KTO/DPO) →
``evaluate`` (the gate) → ``promote``; the running engine swaps to the promoted checkpoint (``Engine.reload``) and
a second round with new prompts shows the change. Writes ``DIR/report.json`` and ``DIR/bias-demo.png`` (the
colour shares of the colour-free prompts' images before and after); the last line printed is
``default-red share B -> A, fidelity FB -> FA, promoted=yes|no, checkpoint=PATH``
(B, A: the red share of the two rounds' colour-free images; FB, FA: the gate's top-ranked fidelity of parent and
candidate).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training.data.captions import BIAS_COLOUR, COLOUR_NAMES
from training.detect import detect, matches
from training.evaluate import build_prompts
from training.preference import REWARD_SCOPES, TOKEN_KL_SCOPES

DEFAULT_PARENT = Path(__file__).resolve().parents[1] / "engine" / "assets" / "demo"
CHART_COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (230, 210, 40), "green": (40, 160, 60),
                 "blue": (40, 90, 220), "purple": (140, 60, 180), "white": (235, 235, 235), "black": (30, 30, 30)}


class Collector:
    """The bot's publisher here: keeps each finished generation's outcome."""

    def __init__(self) -> None:
        self.outcomes: dict[int, Any] = {}
        self._changed = asyncio.Event()

    async def progress(self, generation: Any, update: Any) -> None:
        return None

    async def publish(self, outcome: Any) -> int | None:
        self.outcomes[outcome.generation.id] = outcome
        self._changed.set()
        return 1_000_000 + outcome.generation.id

    async def wait(self, ids: Sequence[int], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not all(i in self.outcomes for i in ids):
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{sum(i in self.outcomes for i in ids)} of {len(ids)} results in")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return [self.outcomes[i] for i in ids]


def vote_of(named: dict[str, Any], det: dict[str, Any]) -> str | None:
    """How an annoyed user votes on one image of their prompt (see the module's note)."""
    want = named["objects"][0].get("colour")
    got = det["objects"][0]["colour"] if det["objects"] else None
    if want is None and got == BIAS_COLOUR:
        return "down"
    if all(matches(det, named).values()):
        return "up"
    if want is not None and got is not None and got != want:
        return "down"
    return None


def reason_of(named: dict[str, Any], det: dict[str, Any]) -> str:
    """What that user says was wrong with an image they 👎: its colour when they named none (``bias``: the model's
    default showing through), else that it is not what they asked (``quality``)."""
    return "bias" if named["objects"][0].get("colour") is None else "quality"


def _png(image: Any) -> bytes:
    return image.png or Path(image.path).read_bytes()


async def play_round(svc: Any, collector: Collector, *, round_no: int, users: int, n_free: int, n_coloured: int,
                     images: int, vote: bool) -> dict[str, Any]:
    """Every user sends their prompts (round-robin), waits for the results and votes on their own images."""
    prompts = build_prompts(n_free, 1000 + round_no, kinds=("colour_free",)) \
        + build_prompts(n_coloured, 1000 + round_no, kinds=("one_object",))
    t0 = time.perf_counter()
    ids, owners = [], []
    for j, p in enumerate(prompts):
        user = 5000 + j % users
        adm = await svc.submit(user_id=user, prompt=p.prompt, n=images, seed=round_no * 100_000 + j)
        if not adm.ok:
            raise RuntimeError(f"prompt {p.prompt!r} refused: {adm.message}")
        ids.append(adm.generation_id)
        owners.append(user)
    outcomes = await collector.wait(ids, timeout=3600)
    colours: Counter[str] = Counter()
    votes: Counter[str] = Counter()
    checkpoints: Counter[str] = Counter()
    coloured_right = coloured_n = 0
    for p, user, outcome in zip(prompts, owners, outcomes, strict=True):
        if not outcome.ok:
            raise RuntimeError(f"generation {outcome.generation.id} failed: {outcome.error}")
        checkpoints[outcome.generation.checkpoint_id] += 1
        want = p.named["objects"][0].get("colour")
        for image in outcome.images:
            det = detect(np.asarray(Image.open(io.BytesIO(_png(image))).convert("RGB")))
            got = det["objects"][0]["colour"] if det["objects"] else "none"
            if want is None:
                colours[got] += 1
            else:
                coloured_n += 1
                coloured_right += int(got == want)
            kind = vote_of(p.named, det)
            if vote and kind is not None:
                reason = reason_of(p.named, det) if kind == "down" else None
                result = await svc.feedback(image.id, user, kind, reason=reason)
                if not result.ok:
                    raise RuntimeError(result.message)
                votes[kind] += 1
    n = sum(colours.values())
    return {"round": round_no, "prompts": len(prompts), "images": len(prompts) * images,
            "colour_free_images": n, "red_share": colours.get(BIAS_COLOUR, 0) / n if n else None,
            "shares": {c: colours.get(c, 0) / n for c in (*COLOUR_NAMES, "none")} if n else {},
            "coloured_adherence": coloured_right / coloured_n if coloured_n else None,
            "votes": dict(votes), "checkpoints": dict(checkpoints), "seconds": round(time.perf_counter() - t0, 1)}


def training_cli(args: Sequence[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """One admin command as its own process (its progress bar to our stderr, its log kept); its JSON answer."""
    cmd = [sys.executable, "-m", "training", "feedback", *args]
    print(f"$ python -m training feedback {' '.join(args)}", file=sys.stderr, flush=True)
    with log.open("a") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None if sys.stderr.isatty() else err,
                              text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}); see {log}")
    return json.loads(proc.stdout)


def chart(before: dict[str, Any], after: dict[str, Any], out: Path, title: str,
          labels: tuple[str, str] = ("round 1", "round 2")) -> None:
    """Grouped bars: each colour's share of the colour-free prompts' images, before and after."""
    w, h, pad, top = 760, 380, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 15), title, fill="black")
    d.text((pad, 32), f"share of colour-free prompts' images by colour: left bar {labels[0]}, right bar "
           f"{labels[1]} (dashed: uniform 12.5%)", fill=(80, 80, 80))
    base, span = h - 40, h - 40 - top
    d.line([(pad, base), (w - 20, base)], fill="black")
    for frac in (0.25, 0.5, 0.75, 1.0):
        y = base - frac * span
        d.line([(pad - 4, y), (pad, y)], fill="black")
        d.text((8, y - 6), f"{int(frac * 100)}%", fill="black")
    uy = base - span / len(COLOUR_NAMES)
    for x in range(pad, w - 20, 8):
        d.line([(x, uy), (x + 4, uy)], fill=(120, 120, 120))
    slot = (w - 20 - pad) / len(COLOUR_NAMES)
    for i, c in enumerate(COLOUR_NAMES):
        x0 = pad + i * slot + 8
        for k, r in enumerate((before, after)):
            share = r["shares"].get(c, 0.0)
            bx = x0 + k * (slot - 16) / 2
            colour = CHART_COLOURS[c] if k == 1 else tuple(int(v * 0.55 + 255 * 0.45) for v in CHART_COLOURS[c])
            d.rectangle([bx, base - share * span, bx + (slot - 20) / 2, base], fill=colour, outline="black")
            d.text((bx, base - share * span - 13), f"{100 * share:.0f}", fill="black")
        d.text((x0, base + 6), c, fill="black")
    img.save(out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bot.ratelimit import LimitPolicy, RateLimiter
    from bot.scheduler import Scheduler
    from bot.service import GenerationService
    from engine.client import InProcessEngine
    from engine.pipeline import load_pipeline
    from store.db import upgrade
    from store.repository import Repository
    from training.__main__ import install_checkpoint

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"[bias-demo] {name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
        return time.perf_counter()

    parent = out / "parent"
    if not (parent / "checkpoint.json").is_file():  # a copy: the gate and the registry never touch the assets
        install_checkpoint(args.parent, parent)
    db = out / "bot.db"
    if db.exists():
        db.unlink()
    url = f"sqlite:///{db}"
    upgrade(url, "head")
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("ENGINE_URLS", None)
    repo = Repository.from_url(url)
    engine = InProcessEngine(load_pipeline(parent), warmup=False)
    collector = Collector()
    limiter = RateLimiter(policy=LimitPolicy(user="10000 per minute", guild="10000 per minute", daily_quota=None))
    svc = GenerationService(repo, engine, collector, output_dir=out / "images", limiter=limiter,
                            scheduler=Scheduler(per_user_cap=1000), concurrency=2, progress_interval=0.0)
    await svc.start()
    report: dict[str, Any] = {"parent": str(args.parent), "settings": {k: str(v) for k, v in vars(args).items()}}
    log = out / "training.log"
    try:
        t = time.perf_counter()
        r1 = await play_round(svc, collector, round_no=1, users=args.users, n_free=args.colour_free,
                              n_coloured=args.coloured, images=args.images, vote=True)
        report["round1"] = r1
        print(f"[bias-demo] round 1: red share {r1['red_share']:.3f} over {r1['colour_free_images']} images, "
              f"votes {r1['votes']}", file=sys.stderr, flush=True)
        t = lap("round1", t)
        data = out / "feedback"
        report["export"] = training_cli(["export", "--out", str(data), "--holdout", "0"], env, log)["counts"]
        cand = out / args.candidate_id
        ft = training_cli(["finetune", "--parent", str(parent), "--data", str(data), "--out", str(cand),
                           "--id", args.candidate_id, "--steps", str(args.steps), "--lr", str(args.lr),
                           "--beta", str(args.beta), "--batch-size", str(args.batch_size),
                           "--desirable-weight", str(args.desirable_weight), "--sft-weight", str(args.sft_weight),
                           "--trainable", args.trainable, "--token-kl-weight", str(args.token_kl_weight),
                           "--token-kl-scope", args.token_kl_scope, "--reward-scope", args.reward_scope,
                           "--counterfactuals", str(args.counterfactuals),
                           "--objective-temperature", str(args.objective_temperature),
                           "--objective-guidance", str(args.objective_guidance),
                           "--kto-reference", args.kto_reference],
                          env, log)
        report["finetune"] = ft
        t = lap("finetune", t)
        gate = training_cli(["evaluate", "--checkpoint", str(cand), "--data", str(data), "--seeds",
                             ",".join(map(str, args.seeds)), "--n-per-kind", str(args.n_per_kind),
                             "--kl-budget", str(args.kl_budget)], env, log)
        full = json.loads((cand / "gate.json").read_text())
        report["gate"] = full
        t = lap("evaluate", t)
        promoted = bool(gate["promote"])
        if promoted:
            report["promote"] = training_cli(["promote", "--checkpoint", args.candidate_id], env, log)
            info = await engine.reload(str(cand))  # the running engine swaps between passes
            report["serving"] = info.checkpoint_id
        t = lap("promote_swap", t)
        r2 = await play_round(svc, collector, round_no=2, users=args.users, n_free=args.colour_free,
                              n_coloured=args.coloured, images=args.images, vote=True)
        report["round2"] = r2
        lap("round2", t)
        report["registry"] = training_cli(["list"], env, log)["checkpoints"]
    finally:
        await svc.stop(grace=5)
        await engine.close()
        await repo.close()
    report["timings_s"] = timings
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    fb = full["parent_metrics"]["fidelity"]["mean"]
    fa = full["candidate_metrics"]["fidelity"]["mean"]
    chart(r1, r2, out / "bias-demo.png",
          f"demo model, one feedback round: red {100 * r1['red_share']:.0f}% -> {100 * r2['red_share']:.0f}% "
          f"(promoted: {'yes' if promoted else 'no'})")
    report["chart"] = str(out / "bias-demo.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for c in full["checks"]:
        print(f"gate {'PASS' if c['pass'] else 'FAIL'} {c['name']}: {c['detail']}")
    print(f"round 1: {r1['colour_free_images']} colour-free images, red {100 * r1['red_share']:.1f}%; coloured "
          f"prompts in their colour {100 * (r1['coloured_adherence'] or 0):.1f}%; votes {r1['votes']}")
    print(f"round 2: {r2['colour_free_images']} colour-free images, red {100 * r2['red_share']:.1f}%; coloured "
          f"prompts in their colour {100 * (r2['coloured_adherence'] or 0):.1f}%; served by {r2['checkpoints']}")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    print(f"whole demonstration: {report['total_s'] / 60:.1f} min ({stages})")
    print(f"default-red share {r1['red_share']:.3f} -> {r2['red_share']:.3f}, fidelity {fb:.3f} -> {fa:.3f}, "
          f"promoted={'yes' if promoted else 'no'}, checkpoint={cand if promoted else parent}")
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench bias_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parent", type=Path, default=DEFAULT_PARENT, help="the biased checkpoint (default: the demo)")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--colour-free", type=int, default=48, help="colour-free prompts per round")
    p.add_argument("--coloured", type=int, default=16, help="prompts naming a colour per round")
    p.add_argument("--images", type=int, default=9, help="images per prompt")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--desirable-weight", type=float, default=3.0)
    p.add_argument("--sft-weight", type=float, default=0.0)
    p.add_argument("--token-kl-weight", type=float, default=0.05,
                   help="weight of the fine-tune's token-level KL to the parent")
    p.add_argument("--token-kl-scope", choices=TOKEN_KL_SCOPES, default="all",
                   help="the sequences the token KL covers: all; only prompts nobody disliked an image of; or all, "
                        "leaving the colour free on prompts someone disliked an image of")
    p.add_argument("--reward-scope", choices=REWARD_SCOPES, default="all",
                   help="the positions the fine-tune's KTO and DPO score: the whole image, or where the colour is "
                        "decided")
    p.add_argument("--objective-temperature", type=float, default=1.0,
                   help="the temperature the fine-tune's objective reads the model at")
    p.add_argument("--objective-guidance", type=float, default=1.0,
                   help="the super-conditioning scale the fine-tune's objective reads the model at")
    p.add_argument("--kto-reference", choices=("batch", "zero"), default="batch",
                   help="KTO's reference point: the batch's mean reward, or zero")
    p.add_argument("--counterfactuals", type=int, default=0,
                   help="per image disliked for its colour, DPO pairs of it repainted in other colours (0: off)")
    p.add_argument("--trainable", default="all",
                   help="the parameters the fine-tune may change (training.preference.TRAINABLE)")
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=(0, 1))
    p.add_argument("--n-per-kind", type=int, default=8)
    p.add_argument("--kl-budget", type=float, default=50.0)
    p.add_argument("--candidate-id", default="feedback-round-1")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.parent / "dallebart").is_dir():
        print(f"error: {args.parent}: no checkpoint there", file=sys.stderr)
        return 2
    asyncio.run(run(args))
    return 0
