"""Leave-one-bank-out cross-validation of the prompt filter's semantic layer: the figure that predicts a new bank.

``python tests/bot/data/filter_eval/crossval.py [--hidden H] [--epochs N] [--lr LR] [--l2 L2] [--ok-weight W]
[--thresholds 0.5,0.9] [--misses N] [--sweep] [--no-ngrams]``, from the repository root. For each of the
hand-written banks (``bank.py`` with its synthetic rows, ``heldout_bank.py``, ``heldout_bank3.py`` and the measured
banks that train the filter, ``generate.FRESH``) it trains the semantic layer (the encoder's head and the n-gram
model) the way ``python -m bot.promptfilter.train`` does on every other bank (the compositional ``compose.py`` rows
always among them) and runs the whole filter (lists, rules, that layer) on the bank left out, at each threshold for
every class and at the per-class thresholds ``train.py`` ships ("shipped"); ``--sweep`` prints the semantic layer
alone with one class's threshold moved at a time. Subject-grouped folds of one bank share its style and said 98.9 %
where each new bank said 67-85 %; a left-out bank is written in its own words.

The lists were tuned on every training bank's errors (each measured bank's since the round after it was measured), so
the whole filter's figure flatters the lists; the script prints the semantic layer alone too (a row refused when a
non-"ok" class reaches the threshold on any of its views): the figure no list tuning flatters, and the one model
selection uses. Embeddings are cached in ``$TMPDIR/filter_cv_embeddings.npz`` (keyed by the encoder's input text).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import generate  # noqa: E402

from bench.filter import evaluate  # noqa: E402
from bot.promptfilter import PromptFilter, semantic  # noqa: E402
from bot.promptfilter import train as trainer  # noqa: E402

HELD_OUT = ("bank", "heldout_bank", "heldout_bank3",
            *(module for module, _, trains in generate.FRESH.values() if trains))
CACHE = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "filter_cv_embeddings.npz"


class Embeddings:
    """Encoder outputs by input text, computed once and kept on disk between runs."""

    def __init__(self) -> None:
        self.table: dict[str, np.ndarray] = {}
        if CACHE.exists():
            with np.load(CACHE, allow_pickle=False) as z:
                self.table = dict(zip((str(t) for t in z["texts"]), z["x"], strict=True))
        self._encode = semantic.encode

    def __call__(self, texts) -> np.ndarray:  # noqa: ANN001 - drop-in for semantic.encode
        missing = [t for t in dict.fromkeys(texts) if t not in self.table]
        if missing:
            for t, row in zip(missing, self._encode(missing), strict=True):
                self.table[t] = row
        return np.stack([self.table[t] for t in texts])

    def save(self) -> None:
        texts = list(self.table)
        np.savez(CACHE, texts=np.array(texts), x=np.stack([self.table[t] for t in texts]))


def views_of(rows: list) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for text, expected, _, _ in rows:
        for view in trainer.encoder_inputs(text):
            texts.append(view)
            labels.append(expected)
    return texts, labels


def _t(t: float | None) -> str:
    return "shipped" if t is None else f"{t:.2f}"


def sweep(probs: list, classes: tuple[str, ...]) -> None:
    """The semantic layer alone on every left-out row with the shipped per-class thresholds, one class's moved at a
    time: what each class's threshold costs in false refusals for the recall it adds."""
    shipped = np.array([trainer.CLASS_THRESHOLDS.get(c, trainer.THRESHOLD) for c in classes])
    harm = np.array([e != "ok" for e, _ in probs])
    p = np.stack([v for _, v in probs])
    keep = np.array([c != "ok" for c in classes])
    for k, c in enumerate(classes):
        if c == "ok":
            continue
        for t in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            th = shipped.copy()
            th[k] = t
            refused = (p[:, keep] >= th[keep]).any(axis=1)
            print(f"sweep {c:<9} {t:.1f}: layer alone recall {100 * refused[harm].mean():.1f}%, false refusals "
                  f"{100 * refused[~harm].mean():.2f}% ({refused[~harm].sum()}/{(~harm).sum()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=trainer.HIDDEN)
    parser.add_argument("--epochs", type=int, default=trainer.EPOCHS)
    parser.add_argument("--lr", type=float, default=trainer.LR)
    parser.add_argument("--l2", type=float, default=trainer.L2)
    parser.add_argument("--ok-weight", type=float, default=trainer.OK_WEIGHT)
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--only", default=",".join(HELD_OUT), help="which banks to leave out, comma-separated")
    parser.add_argument("--without", default="", help="banks left out of every training set (e.g. compose)")
    parser.add_argument("--misses", type=int, default=0)
    parser.add_argument("--head-only", action="store_true", help="skip the whole filter's run (faster)")
    parser.add_argument("--no-ngrams", action="store_true", help="the head alone, without the n-grams")
    parser.add_argument("--sweep", action="store_true", help="the layer alone with one class's threshold moved")
    args = parser.parse_args(argv)
    banks = generate.build_banks()
    emb = Embeddings()
    semantic.encode = emb  # the filter's own calls read the cache too
    thresholds = [float(t) for t in args.thresholds.split(",")]
    totals = {t: [0, 0, 0, 0] for t in [*thresholds, None]}  # None: the per-class thresholds train.py ships
    head_totals = {t: [0, 0, 0, 0] for t in [*thresholds, None]}
    probs = []  # every left-out row: (expected, each class's highest probability over its views)
    for left in args.only.split(","):
        train_rows = [r for name, rows in banks.items() if name not in (left, *args.without.split(",")) for r in rows]
        texts, labels = views_of(train_rows)
        layer = trainer.fit(emb(texts), texts, labels, ok_weight=args.ok_weight, epochs=args.epochs, lr=args.lr,
                            l2=args.l2, hidden=args.hidden)  # as train.py ships it, with its per-class thresholds
        emb.save()
        if args.no_ngrams:
            layer = dataclasses.replace(layer, ngrams=None)
        head = layer.head
        ok_col = list(head.classes).index("ok")
        per_row_shipped = []
        per_row = []  # the layer alone: each row's highest non-"ok" probability over its views
        for text, expected, _, _ in banks[left]:
            views = trainer.encoder_inputs(text)
            p = layer.probs(views) if views else np.zeros((1, len(head.classes)))
            per_row.append((expected, float(np.delete(p, ok_col, axis=1).max())))
            probs.append((expected, p.max(axis=0)))
            over = p.max(axis=0) >= np.array(head.class_thresholds)  # the shipped per-class thresholds
            per_row_shipped.append((expected, bool(np.delete(over, ok_col).any())))
        for t in thresholds:
            harm = [s for e, s in per_row if e != "ok"]
            ok = [s for e, s in per_row if e == "ok"]
            rh, fh = sum(s >= t for s in harm), sum(s >= t for s in ok)
            head_totals[t] = [a + b for a, b in zip(head_totals[t], (rh, len(harm), fh, len(ok)), strict=True)]
            print(f"left out {left:<14} t={t:.2f}: layer alone recall {100 * rh / len(harm):5.1f}%, "
                  f"false refusals {100 * fh / len(ok):4.1f}%")
        harm = [s for e, s in per_row_shipped if e != "ok"]
        ok = [s for e, s in per_row_shipped if e == "ok"]
        head_totals[None] = [a + b for a, b in zip(head_totals[None], (sum(harm), len(harm), sum(ok), len(ok)),
                                                   strict=True)]
        print(f"left out {left:<14} shipped per-class thresholds: layer alone recall "
              f"{100 * sum(harm) / len(harm):5.1f}%, false refusals {100 * sum(ok) / len(ok):4.1f}%")
        for t in [] if args.head_only else [*thresholds, None]:
            f = PromptFilter(classifier=layer, threshold=t)
            rep = evaluate(lambda s, f=f: (lambda d: (d.allowed, d.category))(f.check(s)), banks[left])
            totals[t] = [a + b for a, b in zip(totals[t], (rep.recall.hit, rep.recall.total, rep.false_refusals.hit,
                                                            rep.false_refusals.total), strict=True)]
            cats = " ".join(f"{c[:4]} {100 * v.rate:.0f}" for c, v in sorted(rep.by_category.items()))
            print(f"left out {left:<14} t={_t(t)}: recall {100 * rep.recall.rate:5.1f}% "
                  f"({rep.recall.hit}/{rep.recall.total}), false refusals {100 * rep.false_refusals.rate:4.1f}% "
                  f"({rep.false_refusals.hit}/{rep.false_refusals.total})  [{cats}]", flush=True)
            if args.misses and t is None:
                for text, expected, got in rep.misses[: args.misses]:
                    print(f"    expected {expected:<9} got {got or 'allowed':<9} {text}")
    if args.sweep:
        sweep(probs, head.classes)
    for t, (rh, rt, fh, ft) in head_totals.items():
        print(f"layer alone, all left-out banks t={_t(t)}: recall {100 * rh / rt:.1f}% ({rh}/{rt}), false refusals "
              f"{100 * fh / ft:.1f}% ({fh}/{ft})")
    for t, (rh, rt, fh, ft) in [] if args.head_only else totals.items():
        print(f"all left-out banks t={_t(t)}: recall {100 * rh / rt:.1f}% ({rh}/{rt}), false refusals "
              f"{100 * fh / ft:.1f}% ({fh}/{ft})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
