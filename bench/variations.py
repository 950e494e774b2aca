"""Variations that keep the chosen image's top token rows, against seed-only variations: how close each stays.

For each prompt, the best-ranked of a 9-image grid is the chosen image. Its variations are sampled twice with the
seed the bot derives for a variation (``bot.service.derive_seed``): once with the top rows of its tokens forced
(``bot.variations.kept_prefix``, what the bot sends now) and once without (what it sent before). Figures, per
candidate against the chosen image: token agreement over the positions the model sampled (those after the kept
prefix) and over all, mean absolute pixel difference (0-255) over the whole image and over its bottom half (the
sampled part), and the cosine of CLIP image embeddings; "spread", the mean pixel difference between two variations
of one set (how much they still vary). ``--picture`` writes a small PNG: the chosen image, then
its prefix-kept variations (top row) and its seed-only variations (bottom row).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bot.service import derive_seed
from bot.variations import KEEP_ROWS, kept_prefix
from engine.api import GenerationRequest, SamplingParams
from engine.pipeline import load_pipeline

PROMPTS = (
    "a large blue square at the top",
    "a red circle on the left",
    "a small yellow star on the right",
    "a green triangle at the bottom",
    "a purple circle in the center",
    "an orange square above a white star",
    "a black triangle near the top",
    "a picture of a red star on the right",
)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def measure(pipe: Any, chosen: Any, images: list[Any], keep: int) -> dict[str, list[float]]:
    """Per-candidate figures of ``images`` against ``chosen`` (see the module docstring)."""
    base_tokens, base_px = np.asarray(chosen.tokens), _pixels(chosen.png)
    half = base_px.shape[0] // 2
    pixels = np.stack([_pixels(im.png) for im in images])
    emb = _unit(np.asarray(pipe.embed_images(pixels / 255.0))) if pipe.clip_config is not None else None
    base_emb = _unit(np.asarray(pipe.embed_images(base_px[None] / 255.0)))[0] if emb is not None else None
    out: dict[str, list[float]] = {"tokens_sampled": [], "tokens_all": [], "pixel_diff": [], "pixel_diff_bottom": [],
                                   "clip_cosine": []}
    for k, im in enumerate(images):
        tokens = np.asarray(im.tokens)
        out["tokens_sampled"].append(float(np.mean(tokens[keep:] == base_tokens[keep:])))
        out["tokens_all"].append(float(np.mean(tokens == base_tokens)))
        out["pixel_diff"].append(float(np.mean(np.abs(pixels[k] - base_px))))
        out["pixel_diff_bottom"].append(float(np.mean(np.abs(pixels[k][half:] - base_px[half:]))))
        if emb is not None:
            out["clip_cosine"].append(float(emb[k] @ base_emb))
    return out


def spread(images: list[Any]) -> float:
    """Mean absolute pixel difference between two variations of one set: how much they differ from each other."""
    px = np.stack([_pixels(im.png) for im in images])
    pairs = [(i, j) for i in range(len(px)) for j in range(i + 1, len(px))]
    return float(np.mean([np.mean(np.abs(px[i] - px[j])) for i, j in pairs])) if pairs else 0.0


def picture(chosen: Any, kept: list[Any], seed_only: list[Any], keep: float, scale: int = 1,
            columns: int = 4) -> Image.Image:
    """The chosen image on the left; prefix-kept variations (top row), seed-only ones (bottom row); labelled."""
    tiles = [Image.open(io.BytesIO(im.png)).convert("RGB") for im in [chosen, *kept, *seed_only]]
    side = tiles[0].size[0] * scale
    label_w, gap, head = 8 + side, 6, 16
    width = label_w + gap + columns * (side + gap)
    canvas = Image.new("RGB", (width, head + 2 * (side + gap) + head), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "chosen", fill=(0, 0, 0))
    canvas.paste(tiles[0].resize((side, side), Image.NEAREST), (4, head + (side + gap) // 2))
    kept_name = f"keeps the top {Fraction(keep).limit_denominator(16)} of the rows (now)"
    for row, (name, images) in enumerate(((kept_name, tiles[1:1 + columns]),
                                          ("seed only (before)", tiles[1 + len(kept):1 + len(kept) + columns]))):
        y = head + row * (side + gap + head // 2)
        draw.text((label_w + gap, y - 13 + row * 2), name, fill=(0, 0, 0))
        for c, tile in enumerate(images):
            canvas.paste(tile.resize((side, side), Image.NEAREST), (label_w + gap + c * (side + gap), y))
    return canvas


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench variations", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="engine/assets/demo")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--n", type=int, default=9, help="variations per chosen image (default 9)")
    ap.add_argument("--keep", type=float, default=KEEP_ROWS, help="share of token rows kept (default the bot's)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature of the prefix-kept variations (default the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--picture", default=None, help="write the first prompt's picture here (PNG)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, Any]:
    pipe = load_pipeline(args.checkpoint, buckets=(args.n,))
    figures: dict[str, dict[str, list[float]]] = {"prefix": {}, "seed_only": {}, "other_grid": {}}
    for p, prompt in enumerate(PROMPTS[: args.prompts]):
        seed = args.seed * 1000 + p
        grid = pipe.generate([GenerationRequest(prompt, n=args.n, seed=seed)])[0]
        chosen = grid.images[0]
        keep = kept_prefix(chosen.tokens, args.keep)
        var_seed = derive_seed(seed, chosen.index)
        params = SamplingParams(temperature=args.temperature)
        kept = pipe.generate([GenerationRequest(prompt, n=args.n, seed=var_seed, image_prefix=keep,
                                                params=params)])[0].images
        plain = pipe.generate([GenerationRequest(prompt, n=args.n, seed=var_seed)])[0].images
        assert all(tuple(int(t) for t in im.tokens[: len(keep)]) == keep for im in kept)
        for name, images in (("prefix", kept), ("seed_only", plain), ("other_grid", grid.images[1:])):
            for key, values in measure(pipe, chosen, images, len(keep)).items():
                figures[name].setdefault(key, []).extend(values)
            figures[name].setdefault("spread", []).append(spread(images))
        print(f"{prompt!r}: chosen index {chosen.index}, kept {len(keep)} tokens", file=out, flush=True)
        if p == 0 and args.picture:
            small = picture(chosen, kept, plain, args.keep).quantize(colors=128)  # a README image: kept small
            small.save(args.picture, optimize=True)
    summary = {name: {key: float(np.mean(v)) for key, v in fig.items() if v} for name, fig in figures.items()}
    print("\n| variations | tokens equal, sampled part | tokens equal, all | pixel diff | pixel diff, bottom half "
          "| CLIP cosine | spread |\n| --- | --- | --- | --- | --- | --- | --- |", file=out)
    kept_label = f"keep the top {Fraction(args.keep).limit_denominator(16)} of the rows"
    kept_label += f", T {args.temperature:g}" if args.temperature else ""
    labels = {"prefix": kept_label, "seed_only": "seed only (before)",
              "other_grid": "the grid's other images"}
    for name, s in summary.items():
        print(f"| {labels[name]} | {100 * s['tokens_sampled']:.1f}% | {100 * s['tokens_all']:.1f}% | "
              f"{s['pixel_diff']:.1f} | {s['pixel_diff_bottom']:.1f} | {s.get('clip_cosine', float('nan')):.3f} | "
              f"{s['spread']:.1f} |",
              file=out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
