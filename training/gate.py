"""The promotion gate: a fine-tuned candidate replaces its parent only if it measurably removes the bias without
paying for it elsewhere.

Both models are measured the same way, on the same prompts and sampling seeds (so the comparison is paired):

- **fidelity**: the existing evaluator's top-ranked fidelity (:mod:`training.evaluate`, every prompt kind);
- **bias**: over every candidate of the colour-free prompts, the share of the dominant colour of the parent (red
  for the demo model), the share of whichever colour dominates, and the total-variation distance of the colour
  histogram to uniform over the palette;
- **colour adherence**: over every candidate of prompts that name a colour, the share drawn in that colour (a
  model that never draws red again has not removed a bias, it has made a new one);
- **blank images**: the share of the colour-free prompts' candidates in which no object is found at all (a model
  that draws nothing lowers the red share too, and the users see all nine images, not only the top-ranked one);
- each per evaluation seed, summarised as mean and 95 % t-interval over the seeds.

:func:`decide` promotes only if the bias falls (the parent's dominant-colour share and the distance to uniform
both lower), fidelity drops by at most ``max_fidelity_drop`` (2 points), colour adherence by at most
``max_adherence_drop``, the blank share rises by at most ``max_blank_rise``, and the KL to the parent
(:func:`kl_to_parent`, nats per image) stays within ``kl_budget``; every check is reported with its numbers either
way.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.captions import BIAS_COLOUR, COLOUR_NAMES
from training.detect import detect
from training.evaluate import ALL_KINDS, build_prompts, generate_candidates, score_candidates

DEFAULT_SEEDS = (0, 1)


def interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and two-sided t-interval of ``values`` (one per seed); a single value has no width (low = high)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0, "values": []}
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": 1, "values": vals}
    from scipy import stats

    sd = float(np.std(vals, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(vals), "values": vals}


def colour_stats(prompts: Sequence[Any], generated: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Colour histogram of the colour-free prompts' candidates and the colour adherence of the coloured ones."""
    hist: Counter[str] = Counter()
    named_total = named_right = 0
    for p, images in zip(prompts, generated, strict=True):
        objects = p.named["objects"]
        if len(objects) != 1:
            continue
        want = objects[0].get("colour")
        for im in images:
            det = detect(np.asarray(Image.open(io.BytesIO(im.png)).convert("RGB")))
            got = det["objects"][0]["colour"] if det["objects"] else None
            if want is None and p.kind == "colour_free":
                hist[got or "none"] += 1
            elif want is not None:
                named_total += 1
                named_right += int(got == want)
    n = sum(hist.values())
    shares = {c: hist.get(c, 0) / n for c in COLOUR_NAMES} if n else {}
    drawn = sum(hist.get(c, 0) for c in COLOUR_NAMES)
    tv = 0.5 * sum(abs(hist.get(c, 0) / drawn - 1 / len(COLOUR_NAMES)) for c in COLOUR_NAMES) if drawn else None
    dominant = max(shares, key=shares.get) if shares else None
    return {"n_colour_free_images": n, "shares": shares, "none_share": hist.get("none", 0) / n if n else None,
            "bias_share": shares.get(BIAS_COLOUR), "dominant": dominant,
            "dominant_share": shares.get(dominant) if dominant else None, "tv_to_uniform": tv,
            "n_coloured_images": named_total,
            "colour_adherence": named_right / named_total if named_total else None}


def measure(pipeline: Any, *, seeds: Sequence[int] = DEFAULT_SEEDS, n_per_kind: int = 8, candidates: int = 9,
            params: Any = None, progress: Any = None) -> dict[str, Any]:
    """Fidelity, bias and colour adherence of ``pipeline`` per seed, and their intervals over the seeds."""
    per_seed = []
    for seed in seeds:
        prompts = build_prompts(n_per_kind, seed, kinds=ALL_KINDS)
        generated = generate_candidates(pipeline, prompts, candidates=candidates, seed=seed, params=params)
        scores = score_candidates(prompts, generated, seed=seed)
        colours = colour_stats(prompts, generated)
        per_seed.append({"seed": seed, "fidelity": scores["top"]["fidelity"],
                         "fidelity_mean_candidate": scores["mean_candidate"]["fidelity"], **colours})
        if progress is not None:
            progress(seed, per_seed[-1])
    keys = ("fidelity", "fidelity_mean_candidate", "bias_share", "dominant_share", "tv_to_uniform",
            "colour_adherence", "none_share")
    shares = {c: interval([s["shares"].get(c, 0.0) for s in per_seed])["mean"] for c in COLOUR_NAMES}
    return {"checkpoint_id": getattr(pipeline, "checkpoint_id", "unknown"), "seeds": list(seeds),
            "n_per_kind": n_per_kind, "candidates": candidates,
            **{k: interval([s[k] for s in per_seed]) for k in keys}, "shares": shares, "per_seed": per_seed}


@dataclass(frozen=True)
class GatePolicy:
    max_fidelity_drop: float = 0.02
    max_adherence_drop: float = 0.02
    max_blank_rise: float = 0.02  # share of colour-free candidates with no object found
    kl_budget: float = 50.0  # nats per image, KL(parent || candidate) on the parent's own samples


def _mean(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    if v is None and m.get("per_seed"):  # measured before the key was summarised: its per-seed values
        return interval([s.get(key) for s in m["per_seed"]])["mean"]
    return v.get("mean") if isinstance(v, dict) else v


def decide(parent: dict[str, Any], candidate: dict[str, Any], kl: float | None,
           policy: GatePolicy | None = None) -> dict[str, Any]:
    """Promote or reject ``candidate`` (metrics of :func:`measure`) against ``parent``; every check named."""
    policy = policy or GatePolicy()
    checks = []

    def check(name: str, ok: bool, detail: str, **numbers: Any) -> None:
        checks.append({"name": name, "pass": bool(ok), "detail": detail, **numbers})

    pb, cb = _mean(parent, "bias_share"), _mean(candidate, "bias_share")
    pt, ct = _mean(parent, "tv_to_uniform"), _mean(candidate, "tv_to_uniform")
    ok = None not in (pb, cb, pt, ct) and cb < pb and ct < pt
    check("bias falls", ok, f"{BIAS_COLOUR} share {_pct(pb)} -> {_pct(cb)}, distance to uniform "
          f"{_num(pt)} -> {_num(ct)}", parent=pb, candidate=cb, parent_tv=pt, candidate_tv=ct)
    pf, cf = _mean(parent, "fidelity"), _mean(candidate, "fidelity")
    drop = None if None in (pf, cf) else pf - cf
    check("fidelity kept", drop is not None and drop <= policy.max_fidelity_drop + 1e-9,
          f"top-ranked fidelity {_pct(pf)} -> {_pct(cf)} (drop allowed {100 * policy.max_fidelity_drop:.0f} points)",
          parent=pf, candidate=cf, limit=policy.max_fidelity_drop)
    pa, ca = _mean(parent, "colour_adherence"), _mean(candidate, "colour_adherence")
    adrop = None if None in (pa, ca) else pa - ca
    check("named colours kept", adrop is not None and adrop <= policy.max_adherence_drop + 1e-9,
          f"coloured prompts drawn in their colour {_pct(pa)} -> {_pct(ca)}", parent=pa, candidate=ca,
          limit=policy.max_adherence_drop)
    pn, cn = _mean(parent, "none_share"), _mean(candidate, "none_share")
    rise = None if None in (pn, cn) else cn - pn
    check("objects still drawn", rise is not None and rise <= policy.max_blank_rise + 1e-9,
          f"colour-free candidates with no object {_pct(pn)} -> {_pct(cn)} (rise allowed "
          f"{100 * policy.max_blank_rise:.0f} points)", parent=pn, candidate=cn, limit=policy.max_blank_rise)
    check("KL to parent within budget", kl is not None and kl <= policy.kl_budget,
          f"KL(parent || candidate) {_num(kl)} nats/image (budget {policy.kl_budget:g})", value=kl,
          limit=policy.kl_budget)
    return {"promote": all(c["pass"] for c in checks), "checks": checks, "policy": asdict(policy)}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def kl_to_parent(parent_dir: str | Path, candidate_dir: str | Path, data_dir: str | Path, *,
                 batch_size: int = 16, max_rows: int = 256) -> dict[str, Any]:
    """KL(parent ‖ candidate) in nats per image, estimated on the exported sequences (the parent sampled them):
    mean of ``log p_parent(y|x) − log p_candidate(y|x)``; ``max_rows`` caps the cost."""
    import pyarrow.parquet as pq

    from engine.config import DalleBartConfig
    from engine.models.layout import load_dallebart_params
    from engine.text import DalleBartTokenizer
    from training.preference import batched_logprobs

    parent, cand = Path(parent_dir), Path(candidate_dir)
    config = DalleBartConfig.from_json(parent / "dallebart")
    if DalleBartConfig.from_json(cand / "dallebart").to_dict() != config.to_dict():
        raise ValueError(f"{cand}: not the same architecture as {parent}")
    rows = pq.read_table(Path(data_dir) / "unpaired.parquet").to_pylist()
    rows = [r for r in rows if len(r["tokens"]) == config.image_length]
    rows = sorted(rows, key=lambda r: r["example_id"])[:max_rows]
    if not rows:
        raise ValueError(f"{data_dir}: no sequences to measure the KL on")
    tok = DalleBartTokenizer.from_dir(parent / "dallebart", max_length=config.max_text_length,
                                      normalize=config.normalize_text)([r["prompt"] for r in rows])
    labels = np.asarray([r["tokens"] for r in rows], np.int32)
    lp = {}
    for name, d in (("parent", parent), ("candidate", cand)):
        params = load_dallebart_params(d / "dallebart", config, dtype="float32")
        lp[name] = batched_logprobs(config, params, tok["input_ids"], tok["attention_mask"], labels, batch_size)
    diff = lp["parent"] - lp["candidate"]
    return {"kl": float(np.mean(diff)), "n": len(rows), "per_token": float(np.mean(diff)) / config.image_length}
