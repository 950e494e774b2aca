"""Evaluate a checkpoint on the shapes task: fidelity, CLIP-ranking gain, default share, VQGAN PSNR.

The yardstick is the analytic detector (:mod:`training.detect`), so every number is exact for the procedural
dataset (``specs/shapes-dataset.md``, Evaluation):

- **prompts** outside the training captions: the held-out colour/shape pairs, the held-out caption templates,
  colour-free prompts (:func:`training.data.shapes.eval_prompts`), plus ordinary one- and two-object captions
  drawn from a dataset seed the training never used (minus any caption text seen in training, when known);
- every prompt gets ``candidates`` images from the real pipeline (several prompts per ``generate`` call);
- **fidelity** (all named attributes and the object count match) overall, per attribute and per prompt kind,
  for the CLIP top-ranked image, for one random candidate per prompt (fixed seed) and averaged over every
  candidate (the expected fidelity of a random pick); **CLIP-ranking gain** = top-ranked − random;
- **default share**: fraction of the colour-free prompts' images (all candidates) whose object is red — the
  injected bias is 0.7, an unbiased model gives 1/8;
- **VQGAN PSNR**: encode → decode of dataset images with the checkpoint's own VQGAN, and the detector's fidelity
  on those reconstructions (the ceiling for the generated images: what the VQGAN cannot draw back from its own
  tokens, no DalleBart can make it draw).

:func:`evaluate_pipeline` works on any :class:`engine.api.Pipeline` (tests pass a fake); :func:`evaluate_checkpoint`
loads a checkpoint directory. Both write ``report.json``, ``report.png`` (bar chart) and ``samples.png`` (contact
sheet of top-ranked images) when given ``out_dir``.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.api import GenerationRequest, SamplingParams
from training.data.captions import BIAS_COLOUR, COLOUR_NAMES, HELD_OUT_PAIRS
from training.data.shapes import EVAL_KINDS, ShapesConfig, eval_prompts, render_scene, sample_scene
from training.detect import detect, matches

EXTRA_KINDS = ("one_object", "two_object")
ALL_KINDS = EVAL_KINDS + EXTRA_KINDS
EVAL_DATA_SEED = 90_001  # dataset seed for in-distribution prompts and PSNR images; training uses small seeds
ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "count")

# The quality bars of the shipped demo model: (name, section, key, threshold). Values come from the top-ranked
# image of ``candidates`` (9) on prompts outside the training captions.
BARS: tuple[tuple[str, str, str, float], ...] = (
    ("colour", "per_attribute", "colour", 0.95),
    ("shape", "per_attribute", "shape", 0.90),
    ("position", "per_attribute", "position", 0.85),
    ("held-out pairs", "per_kind", "held_out_pair", 0.80),
    ("VQGAN PSNR (dB)", "vqgan", "psnr", 30.0),
)


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt: text, the attributes it names, and its kind (one of :data:`ALL_KINDS`)."""

    prompt: str
    named: dict[str, Any]
    kind: str


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def build_prompts(n_per_kind: int = 16, seed: int = 0, *, kinds: Sequence[str] = ALL_KINDS,
                  train_captions: Iterable[str] | None = None) -> list[Prompt]:
    """``n_per_kind`` prompts of each kind, deterministic in ``seed``.

    ``one_object`` (colour named) and ``two_object`` captions come from dataset seed ``EVAL_DATA_SEED + seed``;
    captions whose text is in ``train_captions`` are skipped (the held-out kinds are unseen by construction).
    """
    if n_per_kind < 1:
        raise ValueError(f"n_per_kind must be >= 1, got {n_per_kind}")
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise ValueError(f"unknown prompt kind(s) {unknown}; expected some of {ALL_KINDS}")
    seen = {_norm(c) for c in train_captions} if train_captions is not None else set()
    out: list[Prompt] = []
    base = [k for k in kinds if k in EVAL_KINDS]
    out += [Prompt(p.prompt, p.named, p.kind) for p in eval_prompts(n_per_kind, seed, tuple(base))] if base else []
    for kind in (k for k in kinds if k in EXTRA_KINDS):
        cfg = ShapesConfig(blank_rate=0.0, colour_free_rate=0.0, two_object_rate=1.0 if kind == "two_object" else 0.0)
        rng = np.random.default_rng(np.random.SeedSequence([EVAL_DATA_SEED + seed, ALL_KINDS.index(kind)]))
        got: list[Prompt] = []
        for _ in range(200 * n_per_kind):
            spec, caption = sample_scene(rng, cfg)
            if _norm(caption) not in seen and all(p.prompt != caption for p in got):
                got.append(Prompt(caption, spec["named"], kind))
                if len(got) == n_per_kind:
                    break
        if len(got) < n_per_kind:
            raise ValueError(f"could not draw {n_per_kind} unseen {kind} prompts (training covers the captions)")
        out += got
    return out


# ----------------------------------------------------------------------------------------------- scoring


def _aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"n", "fidelity", "per_attribute"}`` of records ``{"matches": {attr: bool}, "ok": bool}``."""
    if not records:
        return {"n": 0, "fidelity": None, "per_attribute": {}}
    totals: dict[str, list[int]] = {}
    for r in records:
        for k, v in r["matches"].items():
            t = totals.setdefault(k, [0, 0])
            t[0] += int(v)
            t[1] += 1
    return {
        "n": len(records),
        "fidelity": sum(r["ok"] for r in records) / len(records),
        "per_attribute": {k: c / n for k, (c, n) in sorted(totals.items())},
        "n_per_attribute": {k: n for k, (_, n) in sorted(totals.items())},
    }


def _summary(records: Sequence[dict[str, Any]], kinds: Sequence[str]) -> dict[str, Any]:
    out = _aggregate(records)
    out["per_kind"] = {k: _aggregate([r for r in records if r["kind"] == k]) for k in kinds}
    return out


def _score(image: np.ndarray, named: dict[str, Any]) -> dict[str, Any]:
    det = detect(image)
    m = matches(det, named)
    return {"detected": det, "matches": m, "ok": all(m.values())}


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def generate_candidates(pipeline: Any, prompts: Sequence[Prompt], *, candidates: int = 9, seed: int = 0,
                        params: SamplingParams | None = None, max_rows: int | None = None) -> list[list[Any]]:
    """Per prompt, its ``candidates`` generated images (``GeneratedImage``, rank order), several prompts a call.

    ``max_rows``: candidates per ``generate`` call (default: the pipeline's largest batch bucket, else 32).
    Prompt ``j`` uses seed ``seed * 1_000_003 + j``, so a prompt's images do not depend on the batching.
    """
    buckets = getattr(pipeline, "batch_buckets", None)
    limit = int(max_rows or (max(buckets) if buckets else 32))
    if not 1 <= candidates <= limit:
        raise ValueError(f"candidates must be between 1 and the pipeline's largest batch ({limit}), got {candidates}")
    per_call = max(1, limit // candidates)
    params = params or SamplingParams()
    out: list[list[Any]] = []
    for start in range(0, len(prompts), per_call):
        reqs = [GenerationRequest(prompt=p.prompt, n=candidates, seed=(seed * 1_000_003 + start + i) % 2**63,
                                  params=params)
                for i, p in enumerate(prompts[start : start + per_call])]
        results = pipeline.generate(reqs)
        if len(results) != len(reqs):
            raise RuntimeError(f"pipeline returned {len(results)} results for {len(reqs)} requests")
        for res in results:
            images = sorted(res.images, key=lambda im: im.rank)
            if len(images) != candidates:
                raise RuntimeError(f"pipeline returned {len(images)} images for n={candidates}")
            out.append(images)
    return out


def score_candidates(prompts: Sequence[Prompt], generated: Sequence[Sequence[Any]], *, seed: int = 0
                     ) -> dict[str, Any]:
    """Detect every candidate and aggregate: top-ranked, one random candidate, mean over candidates, bias."""
    if len(prompts) != len(generated):
        raise ValueError(f"{len(generated)} candidate lists for {len(prompts)} prompts")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4242]))
    kinds = [k for k in ALL_KINDS if any(p.kind == k for p in prompts)]
    top, rand, every, per_prompt = [], [], [], []
    red = colour_free_images = red_top = 0
    for p, images in zip(prompts, generated, strict=True):
        scored = [_score(_image(im.png), p.named) | {"kind": p.kind, "index": im.index, "rank": im.rank,
                                                    "clip_score": float(im.clip_score)} for im in images]
        pick = int(rng.integers(len(scored)))  # a random candidate index (not rank): what no ranking would give
        by_index = sorted(scored, key=lambda s: s["index"])
        top.append(scored[0])
        rand.append(by_index[pick])
        every.extend(scored)
        single = len(p.named["objects"]) == 1 and p.named["objects"][0].get("colour") is None
        if p.kind == "colour_free" and single:
            for s in scored:
                objs = s["detected"]["objects"]
                is_red = bool(objs) and objs[0]["colour"] == BIAS_COLOUR
                red += int(is_red)
                colour_free_images += 1
                red_top += int(is_red and s is scored[0])
        per_prompt.append({
            "prompt": p.prompt, "kind": p.kind, "named": p.named,
            "top": {"index": scored[0]["index"], "ok": scored[0]["ok"], "matches": scored[0]["matches"],
                    "clip_score": scored[0]["clip_score"], "detected": _brief(scored[0]["detected"])},
            "random": {"index": by_index[pick]["index"], "ok": by_index[pick]["ok"]},
            "candidates_ok": sum(s["ok"] for s in scored),
        })
    n_cf = sum(p.kind == "colour_free" for p in prompts)
    top_s, rand_s, mean_s = _summary(top, kinds), _summary(rand, kinds), _summary(every, kinds)
    attrs = sorted(set(top_s["per_attribute"]) | set(rand_s["per_attribute"]))
    return {
        "top": top_s,
        "random": rand_s,
        "mean_candidate": mean_s,
        "clip_gain": {
            "fidelity": _diff(top_s["fidelity"], rand_s["fidelity"]),
            "fidelity_vs_mean": _diff(top_s["fidelity"], mean_s["fidelity"]),
            "per_attribute": {a: _diff(top_s["per_attribute"].get(a), rand_s["per_attribute"].get(a))
                              for a in attrs},
        },
        "default_share": {
            "value": red / colour_free_images if colour_free_images else None,
            "top_ranked": red_top / n_cf if n_cf else None,
            "n_images": colour_free_images,
            "n_prompts": n_cf,
            "bias_colour": BIAS_COLOUR,
            "injected": 0.7,
            "unbiased": 1 / len(COLOUR_NAMES),
        },
        "prompts": per_prompt,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _brief(det: dict[str, Any]) -> dict[str, Any]:
    keys = ("colour", "shape", "size", "position")
    return {"background": det["background"], "objects": [{k: o[k] for k in keys} for o in det["objects"]]}


# ------------------------------------------------------------------------------------------------- VQGAN


def held_out_pair_scenes(n: int, seed: int = EVAL_DATA_SEED) -> list[dict[str, Any]]:
    """``n`` one-object scenes whose caption names a held-out (colour, shape) pair: images no training set holds."""
    cfg = ShapesConfig(blank_rate=0.0, colour_free_rate=0.0, two_object_rate=0.0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D]))
    scenes: list[dict[str, Any]] = []
    for _ in range(1000 * max(n, 1)):
        if len(scenes) == n:
            break
        spec, _caption = sample_scene(rng, cfg, allow_held_out=True)
        obj = spec["named"]["objects"][0]
        if (obj["colour"], obj["shape"]) in HELD_OUT_PAIRS:
            scenes.append(spec)
    return scenes


def vqgan_quality(vqgan_dir: str | Path, n_images: int = 64, *, seed: int = EVAL_DATA_SEED,
                  batch_size: int = 16) -> dict[str, Any]:
    """Encode → decode quality on ``n_images`` unseen dataset images: PSNR (dB; mean and min), codes used, and
    the detector run on the reconstructions against each scene's attributes (``recon_fidelity``,
    ``recon_per_attribute``); the same on ``n_images`` images of the held-out colour/shape pairs, which no
    training image shows (``held_out_pairs``).

    The reconstruction fidelity is the ceiling of the generated images' fidelity: a shape the VQGAN cannot
    draw back from its own tokens, no DalleBart can make it draw. The held-out pairs' figure is that ceiling for
    the held-out-pairs bar.
    """
    from training.encode import load_vqgan
    from training.train_vqgan import reconstruct

    model, config, params = load_vqgan(vqgan_dir)

    def recon(scenes: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        images = np.stack([render_scene(spec, config.output_resolution) for spec in scenes]).astype(np.float32) / 255.0
        metrics, recons = reconstruct(model, params, images, batch_size, keep=True)
        return metrics, _aggregate([_score(im, spec["named"]) for im, spec in zip(recons, scenes, strict=True)])

    cfg = ShapesConfig(blank_rate=0.0)
    rng = np.random.default_rng(seed)
    metrics, agg = recon([sample_scene(rng, cfg)[0] for _ in range(n_images)])
    held_scenes = held_out_pair_scenes(n_images, seed)
    held_metrics, held = recon(held_scenes)
    return metrics | {"recon_fidelity": agg["fidelity"], "recon_per_attribute": agg["per_attribute"],
                      "n_images": n_images,
                      "held_out_pairs": {"psnr": held_metrics["psnr"], "recon_fidelity": held["fidelity"],
                                         "recon_per_attribute": held["per_attribute"], "n_images": len(held_scenes)}}


# -------------------------------------------------------------------------------------------------- bars


def check_bars(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each quality bar with its value (None when not measured) and pass/fail."""
    out = []
    for name, section, key, threshold in BARS:
        if section == "vqgan":
            value = (report.get("vqgan") or {}).get(key)
        elif section == "per_kind":
            value = report["top"]["per_kind"].get(key, {}).get("fidelity")
        else:
            value = report["top"][section].get(key)
        out.append({"name": name, "value": value, "threshold": threshold,
                    "pass": None if value is None else bool(value >= threshold)})
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human summary with PASS/FAIL per bar."""
    s = report["settings"]
    lines = [f"checkpoint {report['checkpoint_id']}: {report['n_prompts']} prompts x {s['candidates']} candidates"
             f" ({'CLIP-ranked' if s['clip_ranking'] else 'NOT ranked: no CLIP'})"]
    for b in report["bars"]:
        fmt = "{:.1f}" if b["threshold"] > 1 else "{:.1%}"
        value = "n/a" if b["value"] is None else fmt.format(b["value"])
        verdict = "----" if b["pass"] is None else ("PASS" if b["pass"] else "FAIL")
        lines.append(f"  {verdict}  {b['name']:<16} {value:>8}  (bar {fmt.format(b['threshold'])})")
    g, t, r = report["clip_gain"]["fidelity"], report["top"]["fidelity"], report["random"]["fidelity"]
    lines.append(f"  fidelity: top-ranked {t:.1%}, random candidate {r:.1%}, CLIP-ranking gain {g:+.1%}")
    d = report["default_share"]
    if d["value"] is not None:
        lines.append(f"  default share (colour-free prompts drawn red): {d['value']:.1%} of {d['n_images']} images"
                     f" (injected bias 70%, unbiased 12.5%)")
    vq = report.get("vqgan") or {}
    if vq.get("recon_fidelity") is not None:
        per = vq["recon_per_attribute"]
        lines.append(f"  VQGAN reconstructions of {vq['n_images']} dataset images (the ceiling): fidelity "
                     f"{vq['recon_fidelity']:.1%}, colour {per.get('colour', 0):.1%}, shape {per.get('shape', 0):.1%},"
                     f" position {per.get('position', 0):.1%}")
    held = vq.get("held_out_pairs") or {}
    if held.get("recon_fidelity") is not None:
        lines.append(f"  VQGAN reconstructions of {held['n_images']} held-out-pair images (never in training): "
                     f"fidelity {held['recon_fidelity']:.1%}, shape {held['recon_per_attribute'].get('shape', 0):.1%}")
    return lines


# ------------------------------------------------------------------------------------------------ charts


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_chart(report: dict[str, Any]) -> Image.Image:
    """Bar chart: per-attribute (and per held-out kind) fidelity, top-ranked vs random, bars as red lines."""
    top, rand = report["top"], report["random"]
    groups: list[tuple[str, float | None, float | None, float | None]] = [
        ("overall", top["fidelity"], rand["fidelity"], None)]
    thresholds = {key: thr for _, section, key, thr in BARS if section == "per_attribute"}
    for a in ATTRIBUTES:
        if a in top["per_attribute"]:
            groups.append((a, top["per_attribute"][a], rand["per_attribute"].get(a), thresholds.get(a)))
    for k, v in top["per_kind"].items():
        groups.append((k.replace("_", " "), v["fidelity"], rand["per_kind"][k]["fidelity"],
                       0.80 if k == "held_out_pair" else None))
    W, H, left, bottom, top_m = 120 + 90 * len(groups), 470, 60, 120, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(11)
    plot_h = H - bottom - top_m
    y_of = lambda v: top_m + plot_h * (1 - v)  # noqa: E731
    d.text((left, 10), f"Fidelity of checkpoint {report['checkpoint_id']} "
                       f"({report['n_prompts']} prompts x {report['settings']['candidates']} candidates)",
           fill="black", font=f)
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([(left, y_of(v)), (W - 20, y_of(v))], fill=(225, 225, 225))
        d.text((8, y_of(v) - 7), f"{v:.0%}", fill="black", font=fs)
    colours = {"top": (40, 80, 220), "random": (170, 170, 170)}
    for i, (name, t, r, thr) in enumerate(groups):
        x0 = left + 20 + 90 * i
        for j, (val, col) in enumerate(((t, colours["top"]), (r, colours["random"]))):
            if val is None:
                continue
            xa = x0 + 30 * j
            d.rectangle([xa, y_of(val), xa + 26, y_of(0)], fill=col)
            d.text((xa, y_of(val) - 13), f"{val:.0%}", fill="black", font=fs)
        if thr is not None:
            d.line([(x0 - 6, y_of(thr)), (x0 + 62, y_of(thr))], fill=(220, 40, 40), width=2)
        for k, part in enumerate(textwrap.wrap(name, 11)):
            d.text((x0, y_of(0) + 6 + 13 * k), part, fill="black", font=fs)
    ly = H - bottom + 40
    d.rectangle([left, ly, left + 12, ly + 12], fill=colours["top"])
    d.text((left + 18, ly), "CLIP top-ranked", fill="black", font=fs)
    d.rectangle([left + 140, ly, left + 152, ly + 12], fill=colours["random"])
    d.text((left + 158, ly), "random candidate", fill="black", font=fs)
    d.line([(left + 290, ly + 6), (left + 320, ly + 6)], fill=(220, 40, 40), width=2)
    d.text((left + 326, ly), "quality bar", fill="black", font=fs)
    ds, vq = report["default_share"], report.get("vqgan") or {}
    info = [f"CLIP-ranking gain: {report['clip_gain']['fidelity']:+.1%}"]
    if ds["value"] is not None:
        info.append(f"default share (colour-free -> red): {ds['value']:.1%} (injected 70%, unbiased 12.5%)")
    if vq.get("psnr") is not None:
        info.append(f"VQGAN PSNR: {vq['psnr']:.1f} dB (bar 30 dB)")
    d.text((left, ly + 22), "   |   ".join(info), fill="black", font=fs)
    return img


def contact_sheet(prompts: Sequence[Prompt], generated: Sequence[Sequence[Any]], records: Sequence[dict[str, Any]],
                  per_kind: int = 2, cell: int = 128) -> Image.Image:
    """Top-ranked images of ``per_kind`` prompts of each kind, with the prompt and OK/MISS under each."""
    chosen: list[int] = []
    for kind in ALL_KINDS:
        chosen += [i for i, p in enumerate(prompts) if p.kind == kind][:per_kind]
    cols = min(len(chosen), 5) or 1
    rows = math.ceil(len(chosen) / cols) or 1
    ch = cell + 64
    sheet = Image.new("RGB", (cols * (cell + 10) + 10, rows * ch + 10), "white")
    d = ImageDraw.Draw(sheet)
    fs = _font(10)
    for n, i in enumerate(chosen):
        x, y = 10 + (n % cols) * (cell + 10), 10 + (n // cols) * ch
        img = Image.open(io.BytesIO(generated[i][0].png)).convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(img, (x, y))
        ok = records[i]["top"]["ok"]
        d.text((x, y + cell + 2), ("OK " if ok else "MISS ") + prompts[i].kind, fill=(0, 130, 0) if ok else
               (200, 0, 0), font=fs)
        for k, part in enumerate(textwrap.wrap(prompts[i].prompt, 24)[:4]):
            d.text((x, y + cell + 14 + 11 * k), part, fill="black", font=fs)
    return sheet


# ------------------------------------------------------------------------------------------------- entry


def evaluate_pipeline(pipeline: Any, *, n_per_kind: int = 16, candidates: int = 9, seed: int = 0,
                      out_dir: str | Path | None = None, vqgan_dir: str | Path | None = None,
                      psnr_images: int = 64, train_captions: Iterable[str] | None = None,
                      params: SamplingParams | None = None, kinds: Sequence[str] = ALL_KINDS,
                      checkpoint_id: str | None = None) -> dict[str, Any]:
    """Evaluate any pipeline (``generate([GenerationRequest])`` → ranked images); see the module docstring."""
    t0 = time.perf_counter()
    prompts = build_prompts(n_per_kind, seed, kinds=kinds, train_captions=train_captions)
    generated = generate_candidates(pipeline, prompts, candidates=candidates, seed=seed, params=params)
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = score_candidates(prompts, generated, seed=seed)
    t_score = time.perf_counter() - t1
    vq = None
    if vqgan_dir is not None and psnr_images > 0:
        vq = vqgan_quality(vqgan_dir, psnr_images)
    params = (params or SamplingParams()).resolve(getattr(pipeline, "sampling_defaults", None))
    report: dict[str, Any] = {
        "checkpoint_id": checkpoint_id or getattr(pipeline, "checkpoint_id", "unknown"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "n_per_kind": n_per_kind, "candidates": candidates, "seed": seed, "kinds": list(kinds),
            "clip_ranking": getattr(pipeline, "clip_config", True) is not None,
            "sampling": {"condition_scale": params.condition_scale, "top_k": params.top_k, "top_p": params.top_p,
                         "temperature": params.temperature},
            "train_captions_excluded": train_captions is not None,
        },
        "n_prompts": len(prompts),
        "n_images": len(prompts) * candidates,
        **{k: v for k, v in scores.items() if k != "prompts"},
        "vqgan": vq,
        "timings_s": {"generate": t_gen, "score": t_score, "total": time.perf_counter() - t0},
    }
    report["bars"] = check_bars(report)
    report["passed"] = all(b["pass"] for b in report["bars"] if b["pass"] is not None)
    report["prompts"] = scores["prompts"]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["files"] = {"report": str(out / "report.json"), "chart": str(out / "report.png"),
                           "samples": str(out / "samples.png")}
        draw_chart(report).save(out / "report.png")
        contact_sheet(prompts, generated, scores["prompts"]).save(out / "samples.png")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def training_captions(checkpoint_dir: str | Path) -> list[str] | None:
    """Captions the DalleBart saw, from ``CHECKPOINT/tokens/*.parquet`` when the training shards are there."""
    shards = Path(checkpoint_dir) / "tokens"
    if not (shards.is_dir() and any(shards.glob("*.parquet"))):
        return None
    from training.data.parquet import iter_token_shards

    return [row["caption"] for row in iter_token_shards(shards)]


def evaluate_checkpoint(checkpoint_dir: str | Path, *, n_per_kind: int = 16, candidates: int = 9, seed: int = 0,
                        out_dir: str | Path | None = None, psnr_images: int = 64,
                        train_captions: Iterable[str] | None = None, params: SamplingParams | None = None,
                        **pipeline_opts: Any) -> dict[str, Any]:
    """Load ``checkpoint_dir`` (the :func:`engine.pipeline.load_pipeline` layout) and evaluate it.

    ``params``: sampling overrides; unset fields take the checkpoint's recommended values.

    Training captions are excluded from the in-distribution prompts when given, or when the checkpoint directory
    still holds its ``tokens/`` shards.
    """
    from engine.pipeline import load_pipeline

    directory = Path(checkpoint_dir)
    pipeline = load_pipeline(directory, **pipeline_opts)
    if train_captions is None:
        train_captions = training_captions(directory)
    return evaluate_pipeline(pipeline, n_per_kind=n_per_kind, candidates=candidates, seed=seed, out_dir=out_dir,
                             vqgan_dir=directory / "vqgan", psnr_images=psnr_images, train_captions=train_captions,
                             params=params)
