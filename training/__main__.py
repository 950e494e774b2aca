"""``python -m training <command>``: train the demo models on the procedural shapes dataset.

Commands (each resumable: run the same command again after an interruption):

  vqgan      train a VQGAN                         → --out DIR (config.json, flax_model.msgpack)
  encode     images → VQGAN token shards            → --out DIR (shard-*.parquet)
  dallebart  train DalleBart on token shards        → --out DIR (+ tokenizer files)
  clip       train CLIP on image–caption pairs      → --out DIR (+ tokenizer files)
  demo       vqgan → encode → dallebart → clip → evaluate into one directory (small sizes; see --help);
             --install DIR then copies the inference files (e.g. engine/assets/demo)
  evaluate   fidelity / CLIP gain / default share / VQGAN PSNR of a checkpoint → report.json, report.png
  install    copy a checkpoint's inference files (no training state) into a directory
  feedback   the store's votes, reports and moderators' decisions → preference data (Parquet + manifest)

Training state (orbax checkpoints, metrics.jsonl) goes to ``<out>-train`` unless ``--work-dir`` is given.
With more than one device, the batch is split over a ("data", "model") mesh (``--model-parallel`` sets the
model axis); ``--devices 1`` turns that off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from training.optim import OptimConfig
from training.preference import KTO_REFERENCES, REWARD_SCOPES, TOKEN_KL_SCOPES

FEEDBACK_ACTIONS = ("export", "finetune", "evaluate", "promote", "rollback", "list")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _mesh(args: argparse.Namespace) -> Any:
    import jax

    n = jax.device_count()
    if args.devices == 1 or (args.devices is None and n == 1):
        return None
    from engine.sharding import make_mesh

    devices = jax.devices()[: args.devices] if args.devices else None
    return make_mesh(args.model_parallel, devices)


def _optim(args: argparse.Namespace, default_lr: float, steps: int, **extra: Any) -> OptimConfig:
    warmup = args.warmup if args.warmup is not None else min(100, max(steps // 10, 1))
    return OptimConfig(
        name=args.optimizer,
        learning_rate=args.lr if args.lr is not None else default_lr,
        warmup_steps=warmup,
        decay=args.decay,
        decay_steps=max(steps - warmup, 1),
        end_lr_ratio=0.1,
        max_grad_norm=args.clip_grad,
        grad_accum_steps=args.grad_accum,
        **extra,
    )


def _common(p: argparse.ArgumentParser, *, steps: int, batch_size: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser updates (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per update (default {batch_size})")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default min(100, steps/10))")
    p.add_argument("--decay", choices=("constant", "cosine", "linear"), default="cosine")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), default="adamw")
    p.add_argument("--clip-grad", type=float, default=None, help="global-norm gradient clipping")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints + metrics.jsonl (default <out>-train)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--devices", type=int, default=None, help="devices to use (default all)")
    p.add_argument("--model-parallel", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# Architecture flags default to None: unset ones come from --init-from's saved config, else from these.
VQGAN_ARCH_DEFAULTS = {"image_size": 128, "factor": 8, "ch": 16, "n_embed": 512, "embed_dim": 32, "res_blocks": 1,
                       "norm_groups": 4, "ch_mult": None, "decoder_ch_mult": None}
DALLEBART_ARCH_DEFAULTS = {"d_model": 128, "layers": 2, "heads": 4, "ffn": 256, "max_text_length": 32}


def _vqgan_args(p: argparse.ArgumentParser) -> None:
    d = VQGAN_ARCH_DEFAULTS
    p.add_argument("--image-size", type=int, default=None, help=f"(default {d['image_size']})")
    p.add_argument("--factor", type=int, default=None,
                   help=f"downsampling factor (token grid = size/factor; default {d['factor']})")
    p.add_argument("--ch", type=int, default=None, help=f"(default {d['ch']})")
    p.add_argument("--n-embed", type=int, default=None, help=f"codebook size (default {d['n_embed']})")
    p.add_argument("--embed-dim", type=int, default=None, help=f"(default {d['embed_dim']})")
    p.add_argument("--res-blocks", type=int, default=None, help=f"(default {d['res_blocks']})")
    p.add_argument("--norm-groups", type=int, default=None,
                   help=f"GroupNorm groups (several channels per group; default {d['norm_groups']})")
    p.add_argument("--ch-mult", type=_int_tuple, default=None,
                   help="channel multiplier per level, e.g. 1,2,2,4 (default 1,1,2,2,... truncated)")
    p.add_argument("--decoder-ch-mult", type=_int_tuple, default=None,
                   help="the decoder's own multipliers (default: --ch-mult); with --init-from and --decoder-only, "
                        "a new, e.g. wider, decoder trained on the saved encoder's tokens")
    p.add_argument("--data-seed", type=int, default=0)


def _arch(args: argparse.Namespace, defaults: dict[str, Any], saved: dict[str, Any] | None) -> dict[str, Any]:
    """Architecture settings: each flag given on the command line, else the --init-from checkpoint's, else the
    default (so continuing a run needs no architecture flags)."""
    base = saved if saved is not None else defaults
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else base[k] for k in defaults}


def _vqgan_config(args: argparse.Namespace) -> Any:
    from engine.config import VQGANConfig
    from training.train_vqgan import small_vqgan_config

    saved = None
    if getattr(args, "init_from", None) is not None:
        c = VQGANConfig.from_json(args.init_from)
        saved = {"image_size": c.resolution, "factor": c.downsample_factor, "ch": c.ch, "n_embed": c.n_embed,
                 "embed_dim": c.embed_dim, "res_blocks": c.num_res_blocks, "norm_groups": c.norm_groups,
                 "ch_mult": tuple(c.ch_mult), "decoder_ch_mult": c.decoder_ch_mult}
    a = _arch(args, VQGAN_ARCH_DEFAULTS, saved)
    return small_vqgan_config(a["image_size"], a["factor"], ch=a["ch"], n_embed=a["n_embed"],
                              embed_dim=a["embed_dim"], num_res_blocks=a["res_blocks"],
                              norm_groups=a["norm_groups"], ch_mult=a["ch_mult"],
                              decoder_ch_mult=a["decoder_ch_mult"])


def _dallebart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: train one on the captions)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE size when training a tokenizer")
    p.add_argument("--d-model", type=int, default=None, help="(default 128)")
    p.add_argument("--layers", type=int, default=None, help="encoder layers, and decoder layers unless "
                   "--decoder-layers (default 2)")
    p.add_argument("--decoder-layers", type=int, default=None, help="(default: --layers)")
    p.add_argument("--heads", type=int, default=None, help="(default 4)")
    p.add_argument("--ffn", type=int, default=None, help="(default 256)")
    p.add_argument("--max-text-length", type=int, default=None, help="(default 32)")
    p.add_argument("--blank-prob", type=float, default=0.0, help="extra caption blanking (the data has 10%%)")
    p.add_argument("--prefix-noise", type=float, default=0.0,
                   help="share of captions that get 1-3 made-up words in front, so unfamiliar framing words "
                        "(\"an illustration of ...\") are ignored (e.g. 0.3; with demo, the CLIP's captions too)")
    p.add_argument("--vqgan", type=Path, default=None, help="VQGAN checkpoint dir (its n_embed sets the image vocab)")
    p.add_argument("--n-codes", type=int, default=None, help="image vocab size if no --vqgan (default: max code + 1)")


def _sampling_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("sampling", f"{what} (unset: the checkpoint's recommendation, else the reference's)")
    g.add_argument("--scale", type=float, default=None, help="super-conditioning scale")
    g.add_argument("--top-k", type=int, default=None, help="top-k (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="top-p (1 = off)")
    g.add_argument("--temperature", type=float, default=None)


def _sampling_from(args: argparse.Namespace) -> Any:
    from engine.api import BadRequest, SamplingParams

    params = SamplingParams(condition_scale=getattr(args, "scale", None), top_k=getattr(args, "top_k", None),
                            top_p=getattr(args, "top_p", None), temperature=getattr(args, "temperature", None))
    try:
        params.validate()
    except BadRequest as exc:
        raise ValueError(str(exc)) from None
    return params


def _clip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-tokenizer", type=Path, default=None, help="CLIP tokenizer dir (default: train one)")
    p.add_argument("--clip-vocab-size", type=int, default=1024)
    p.add_argument("--clip-image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--clip-layers", type=int, default=2)
    p.add_argument("--clip-heads", type=int, default=4)
    p.add_argument("--hard-negatives", type=float, default=0.5,
                   help="share of each CLIP batch that is one-attribute counterfactuals of the rest (0..0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vqgan", help="train a VQGAN on the shapes dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this exported VQGAN (unset architecture flags take its config)")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: train only the decoder side; the encoder and codebook (the tokens) "
                        "stay exactly as they are")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="extra weight of pixels near colour edges in the reconstruction loss (e.g. 4)")
    p.add_argument("--palette-weight", type=float, default=0.0,
                   help="weight of the per-pixel cross-entropy over the palette colours (sharp colour "
                        "boundaries, e.g. 0.1)")
    p.add_argument("--dead-threshold", type=float, default=0.03,
                   help="codes chosen less often than this per step (moving average) restart on encoder outputs")
    p.add_argument("--uniform-restarts", action="store_true",
                   help="restart dead codes on uniformly drawn encoder outputs (default: in proportion to their "
                        "quantisation error)")
    _vqgan_args(p)
    _common(p, steps=1000, batch_size=8)

    p = sub.add_parser("encode", help="encode shapes images into VQGAN token shards")
    p.add_argument("--vqgan", type=Path, required=True, help="VQGAN checkpoint dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--start", type=int, default=0, help="first dataset index")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--model-parallel", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("dallebart", help="train DalleBart on token shards")
    p.add_argument("--shards", type=Path, required=True, help="token shard dir (python -m training encode)")
    p.add_argument("--eval-shards", type=Path, default=None)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this exported DalleBart (unset architecture flags take its config; its "
                        "tokenizer unless --tokenizer)")
    p.add_argument("--new-image-vocab", action="store_true",
                   help="with --init-from: the shards come from another VQGAN; copy the text encoder and the "
                        "transformer layers, start the image-token embedding and output head afresh")
    p.add_argument("--grow", action="store_true",
                   help="with --init-from and more --layers/--decoder-layers than it has: insert layers that start "
                        "as the identity (the grown model first computes what the saved one did)")
    p.add_argument("--out", type=Path, required=True)
    _dallebart_args(p)
    _common(p, steps=1000, batch_size=32)

    p = sub.add_parser("clip", help="train CLIP on shapes image-caption pairs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue this exported CLIP (its config and tokenizer; architecture flags are ignored)")
    p.add_argument("--vqgan-roundtrip", type=Path, default=None, metavar="VQGAN_DIR",
                   help="train on this VQGAN's encode-decode round-trips of the images (what CLIP ranks at "
                        "inference) instead of the crisp renders")
    p.add_argument("--prefix-noise", type=float, default=0.0,
                   help="share of captions that get 1-3 made-up words in front, so the ranker ignores unfamiliar "
                        "framing words (\"an illustration of ...\") as the DalleBart does (e.g. 0.3)")
    _clip_args(p)
    _common(p, steps=500, batch_size=64)

    p = sub.add_parser("demo", help="vqgan → encode → dallebart → clip into one directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vqgan-steps", type=int, default=1000)
    p.add_argument("--vqgan-decoder-steps", type=int, default=0,
                   help="then fine-tune only the VQGAN decoder this many steps (tokens unchanged; 0: skip); "
                        "--decoder-ch-mult and --palette-weight apply to this stage only")
    p.add_argument("--palette-weight", type=float, default=0.0,
                   help="palette cross-entropy weight of the decoder fine-tune (see training vqgan --help)")
    p.add_argument("--num-images", type=int, default=20_000)
    p.add_argument("--dallebart-steps", type=int, default=2000)
    p.add_argument("--clip-steps", type=int, default=500)
    p.add_argument("--id", default=None, help="checkpoint id (default shapes-demo-<UTC time>)")
    p.add_argument("--install", type=Path, default=None, help="then copy the inference files here")
    p.add_argument("--eval-n-per-kind", type=int, default=16, help="evaluation prompts per kind (0: skip)")
    p.add_argument("--eval-candidates", type=int, default=9)
    _vqgan_args(p)
    _dallebart_args(p)
    _clip_args(p)
    _common(p, steps=0, batch_size=0)
    _sampling_args(p, "record these as the checkpoint's recommended sampling params (evaluation uses them)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out shapes prompts")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint dir (dallebart/, vqgan/, clip/)")
    p.add_argument("--n-per-kind", type=int, default=16, help="prompts per kind (5 kinds; default 16)")
    p.add_argument("--candidates", type=int, default=9, help="images per prompt, CLIP-ranked (default 9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--psnr-images", type=int, default=64, help="dataset images for the VQGAN PSNR (0: skip)")
    p.add_argument("--out", type=Path, default=None, help="report dir (default CHECKPOINT/eval)")
    _sampling_args(p, "evaluate with these sampling params")

    p = sub.add_parser("install", help="copy a checkpoint's inference files (no training state) into a directory")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--to", type=Path, required=True, help="target dir, e.g. engine/assets/demo")
    p.add_argument("--id", default=None, help="checkpoint id to record in the target's checkpoint.json")
    _sampling_args(p, "record these as the checkpoint's recommended sampling params")

    p = sub.add_parser("feedback", help="retrain from feedback: export | finetune | evaluate | promote | rollback | "
                       "list (see training.retrain)")
    p.add_argument("action", nargs="?", default="export", choices=FEEDBACK_ACTIONS,
                   help="export (default): the feedback dataset (KTO rows, DPO pairs); finetune: KTO/DPO on it "
                        "into a candidate; evaluate: the promotion gate; promote / rollback: the active checkpoint "
                        "(engines reload it); list: the registry")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                   help="the bot's database (default: $DATABASE_URL); never migrated here")
    p.add_argument("--out", type=Path, default=None,
                   help="export: the dataset directory; finetune: the new checkpoint directory")
    p.add_argument("--holdout", type=float, default=0.1, help="export: share of prompts held out for evaluation")
    p.add_argument("--max-pairs-per-prompt", type=int, default=32)
    p.add_argument("--data", type=Path, default=None, help="finetune/evaluate: an export directory")
    p.add_argument("--parent", type=Path, default=None,
                   help="finetune/evaluate: the parent checkpoint directory (default: the active one's, for "
                        "evaluate the candidate's registered parent)")
    p.add_argument("--checkpoint", default=None, help="evaluate: a candidate directory; promote: an id")
    p.add_argument("--id", default=None, help="finetune: the new checkpoint's id (default: --out's name)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1, help="KTO/DPO beta on summed token log-probs")
    p.add_argument("--sft-weight", type=float, default=0.0, help="share of supervised loss on liked images")
    p.add_argument("--desirable-weight", type=float, default=3.0)
    p.add_argument("--undesirable-weight", type=float, default=1.0)
    p.add_argument("--token-kl-weight", type=float, default=0.05,
                   help="finetune: weight of the token-level KL to the parent (whole next-token distributions)")
    p.add_argument("--token-kl-scope", choices=TOKEN_KL_SCOPES, default="all",
                   help="finetune: the sequences the token KL covers: all; only prompts nobody disliked an image of; "
                        "or all, leaving the colour free on prompts someone disliked an image of")
    p.add_argument("--reward-scope", choices=REWARD_SCOPES, default="all",
                   help="finetune: the positions KTO and DPO score: the whole image, or only the object's first "
                        "code, where its colour is decided")
    p.add_argument("--objective-temperature", type=float, default=1.0,
                   help="finetune: the temperature KTO, DPO and SFT read the model at (the checkpoint's sampling "
                        "temperature scores what users are shown; default 1.0, the model's own distribution)")
    p.add_argument("--kto-reference", choices=KTO_REFERENCES, default="batch",
                   help="finetune: KTO's reference point, the batch's mean reward (clipped at 0) or zero (a disliked "
                        "image keeps being pushed however fast the liked ones rise)")
    p.add_argument("--objective-guidance", type=float, default=1.0,
                   help="finetune: the super-conditioning scale KTO, DPO and SFT read the model at, against the "
                        "empty prompt (the checkpoint's scale scores what users are shown; default 1.0, the "
                        "conditional model alone)")
    p.add_argument("--counterfactuals", type=int, default=0,
                   help="finetune: per disliked image whose complaint is its colour (a bias reason, a prompt naming "
                        "no colour), that many DPO pairs of it repainted in other colours over it (0: off)")
    p.add_argument("--trainable", default="all",
                   help="finetune: the parameters that may change, the rest keep the parent's values: all, "
                        "encoder, encoder+cross, cross, encoder-embed (training.preference.TRAINABLE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=_int_tuple, default=(0, 1), help="evaluate: evaluation seeds (default 0,1)")
    p.add_argument("--n-per-kind", type=int, default=8, help="evaluate: prompts per kind and seed")
    p.add_argument("--candidates", type=int, default=9)
    p.add_argument("--kl-budget", type=float, default=None, help="evaluate: KL(parent||candidate) nats per image")
    p.add_argument("--force", action="store_true", help="promote: even a candidate the gate rejected")
    p.add_argument("--engine-url", action="append", default=None,
                   help="promote/rollback: engine services to reload, one after the other (repeat; default "
                        "$ENGINE_URLS)")
    p.add_argument("--actor", type=int, default=None,
                   help="finetune/promote/rollback: the user id the audit log names (default: the operator, 1)")
    p.add_argument("--guild", type=int, default=None,
                   help="finetune/evaluate/promote/rollback: the server the action was asked from (audit log)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("bias-demo", help="simulated users' feedback removes the demo model's red bias, end to end "
                       "(python -m bench bias_demo --help for its options)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed on to python -m bench bias_demo")
    return parser


def _train_dalle_tokenizer(captions: list[str], vocab_size: int, out: Path) -> Path:
    from engine.text import TextNormalizer
    from training.tokenizer import train_bpe

    return train_bpe([c for c in captions if c], vocab_size, out, normalizer=TextNormalizer())


def _shard_captions(shards: Path) -> list[str]:
    from training.data.parquet import iter_token_shards

    return [row["caption"] for row in iter_token_shards(shards)]


def _dataset_captions(n: int, seed: int) -> list[str]:
    from training.data.shapes import ShapesDataset

    ds = ShapesDataset(seed)
    return [ds.scene(i)[1] for i in range(n)]


def cmd_vqgan(args: argparse.Namespace, out: Path | None = None, steps: int | None = None) -> dict[str, Any]:
    from training.train_vqgan import VQGANLoss, train_vqgan

    out = out or args.out
    steps = steps if steps is not None else args.steps
    config = _vqgan_config(args)
    res = train_vqgan(out, config, steps=steps, batch_size=args.batch_size or 8,
                      optim=_optim(args, 2e-3, steps, b2=0.99), seed=args.seed, data_seed=args.data_seed,
                      work_dir=args.work_dir if out == args.out else None, save_every=args.save_every,
                      log_every=args.log_every, mesh=_mesh(args), progress=not args.no_progress,
                      init_from=getattr(args, "init_from", None), decoder_only=getattr(args, "decoder_only", False),
                      loss=VQGANLoss(edge_weight=getattr(args, "edge_weight", 0.0),
                                     dead_threshold=getattr(args, "dead_threshold", 0.03),
                                     restart_on_error=not getattr(args, "uniform_restarts", False),
                                     palette_weight=getattr(args, "palette_weight", 0.0)))
    return {"out": str(out), "eval": res.eval_metrics, "steps_per_s": res.result.steps_per_s}


def cmd_encode(args: argparse.Namespace) -> dict[str, Any]:
    from training.encode import encode_shapes

    paths = encode_shapes(args.vqgan, args.out, num_images=args.num_images, seed=args.data_seed,
                          start=args.start, batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                          mesh=_mesh(args), progress=not args.no_progress)
    return {"out": str(args.out), "shards": [str(p) for p in paths]}


def cmd_dallebart(args: argparse.Namespace, shards: Path | None = None, out: Path | None = None,
                  steps: int | None = None) -> dict[str, Any]:
    from engine.config import DalleBartConfig, VQGANConfig
    from engine.text import DalleBartTokenizer
    from training.data.parquet import iter_token_shards
    from training.train_dallebart import small_dallebart_config, train_dallebart

    shards = shards or args.shards
    out = out or args.out
    steps = steps if steps is not None else args.steps
    tok_dir = args.tokenizer
    if tok_dir is None and getattr(args, "init_from", None) is not None:  # continue with the same vocabulary
        tok_dir = args.init_from
    if tok_dir is None:
        tok_dir = _train_dalle_tokenizer(_shard_captions(shards), args.vocab_size,
                                         out.with_name(out.name + "-tokenizer"))
    first = next(iter_token_shards(shards))
    image_length = int(first["encoding"].shape[0])
    if args.vqgan is not None:
        n_codes = VQGANConfig.from_json(args.vqgan).n_embed
    elif args.n_codes is not None:
        n_codes = args.n_codes
    else:
        n_codes = max(int(r["encoding"].max()) for r in iter_token_shards(shards)) + 1
    vocab = DalleBartTokenizer.from_dir(tok_dir).vocab_size
    saved = None
    if getattr(args, "init_from", None) is not None:
        c = DalleBartConfig.from_json(args.init_from)
        saved = {"d_model": c.d_model, "layers": c.encoder_layers, "heads": c.encoder_attention_heads,
                 "ffn": c.encoder_ffn_dim, "max_text_length": c.max_text_length}
    a = _arch(args, DALLEBART_ARCH_DEFAULTS, saved)
    # --decoder-layers, else --layers, else the saved model's, else as many as the encoder
    decoder_layers = getattr(args, "decoder_layers", None)
    if decoder_layers is None:
        decoder_layers = args.layers if args.layers is not None or saved is None else c.decoder_layers
    config = small_dallebart_config(vocab, n_codes, image_length, d_model=a["d_model"], layers=a["layers"],
                                    heads=a["heads"], ffn_dim=a["ffn"], max_text_length=a["max_text_length"],
                                    decoder_layers=decoder_layers)
    optim = _optim(args, 1e-3 if args.optimizer != "adafactor" else 1e-2, steps,
                   **({"b2": 0.98} if args.optimizer == "adamw" else {}))
    res = train_dallebart(out, config, shards, tok_dir, steps=steps, batch_size=args.batch_size or 32,
                          optim=optim, seed=args.seed, blank_caption_prob=args.blank_prob,
                          prefix_noise=args.prefix_noise,
                          eval_shards=getattr(args, "eval_shards", None), init_from=getattr(args, "init_from", None),
                          new_image_vocab=getattr(args, "new_image_vocab", False), grow=getattr(args, "grow", False),
                          work_dir=args.work_dir if out == args.out else None, save_every=args.save_every,
                          log_every=args.log_every, mesh=_mesh(args), progress=not args.no_progress)
    return {"out": str(out), "eval": res.eval_metrics, "steps_per_s": res.result.steps_per_s}


def cmd_clip(args: argparse.Namespace, out: Path | None = None, steps: int | None = None) -> dict[str, Any]:
    from engine.text import CLIPTokenizer
    from training.tokenizer import train_clip_bpe
    from training.train_clip import small_clip_config, train_clip

    out = out or args.out
    steps = steps if steps is not None else args.steps
    init_from = getattr(args, "init_from", None)
    if init_from is not None:
        from engine.config import CLIPConfig

        if not (init_from / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {init_from}: no config.json (is this an exported CLIP?)")
        tok_dir, config = init_from, CLIPConfig.from_json(init_from)
    else:
        tok_dir = args.clip_tokenizer
        if tok_dir is None:
            captions = [c for c in _dataset_captions(5000, getattr(args, "data_seed", 0)) if c]
            tok_dir = train_clip_bpe(captions, args.clip_vocab_size, out.with_name(out.name + "-tokenizer"))
        tokenizer = CLIPTokenizer.from_dir(tok_dir)
        config = small_clip_config(tokenizer, image_size=args.clip_image_size, patch_size=args.patch,
                                   width=args.width, layers=args.clip_layers, heads=args.clip_heads,
                                   projection_dim=args.width)
    optim = _optim(args, 5e-4, steps, b2=0.98, weight_decay=0.1)
    res = train_clip(out, config, tok_dir, steps=steps, batch_size=args.batch_size or 64, optim=optim,
                     hard_negative_rate=args.hard_negatives, init_from=init_from,
                     vqgan_dir=getattr(args, "vqgan_roundtrip", None),
                     prefix_noise=getattr(args, "prefix_noise", 0.0),
                     seed=args.seed, data_seed=getattr(args, "data_seed", 0),
                     work_dir=args.work_dir if out == args.out else None, save_every=args.save_every,
                     log_every=args.log_every, mesh=_mesh(args), progress=not args.no_progress)
    return {"out": str(out), "eval": res.eval_metrics, "steps_per_s": res.result.steps_per_s}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate import evaluate_checkpoint, summary_lines

    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint directory")
    out = args.out or args.checkpoint / "eval"
    report = evaluate_checkpoint(args.checkpoint, n_per_kind=args.n_per_kind, candidates=args.candidates,
                                 seed=args.seed, out_dir=out, psnr_images=args.psnr_images,
                                 params=_sampling_from(args))
    print("\n".join(summary_lines(report)), file=sys.stderr)
    return _eval_brief(report)


def _eval_brief(report: dict[str, Any]) -> dict[str, Any]:
    return {"checkpoint_id": report["checkpoint_id"], "passed": report["passed"], "bars": report["bars"],
            "fidelity_top": report["top"]["fidelity"], "fidelity_random": report["random"]["fidelity"],
            "clip_gain": report["clip_gain"]["fidelity"], "default_share": report["default_share"]["value"],
            "vqgan_psnr": (report["vqgan"] or {}).get("psnr"),
            "vqgan_recon_fidelity": (report["vqgan"] or {}).get("recon_fidelity"), "files": report.get("files", {})}


# what an installed checkpoint needs at inference (engine.pipeline.load_pipeline); training state never goes
_MODEL_FILES = ("config.json", "flax_model.msgpack", "tokenizer.json", "vocab.json", "merges.txt",
                "special_tokens_map.json", "tokenizer_config.json")
_TOP_FILES = ("checkpoint.json", "safety.json")
_EVAL_FILES = ("report.json", "report.png", "samples.png")


def install_checkpoint(root: Path, target: Path) -> list[Path]:
    """Copy only the inference files of checkpoint ``root`` into ``target`` (``*-train``, ``tokens/``, orbax
    state and tokenizer work dirs are skipped). Files are overwritten; others already in ``target`` are kept."""
    import shutil

    root, target = Path(root), Path(target)
    for part in ("dallebart", "vqgan"):
        if not (root / part / "flax_model.msgpack").is_file():
            raise FileNotFoundError(f"{root}: no {part}/flax_model.msgpack (is this a trained checkpoint?)")
    if target.resolve() == root.resolve():
        raise ValueError("install target is the checkpoint itself")
    plan = [(root / part / name, target / part / name) for part in ("dallebart", "vqgan", "clip")
            for name in _MODEL_FILES]
    plan += [(root / name, target / name) for name in _TOP_FILES]
    plan += [(root / "eval" / name, target / "eval" / name) for name in _EVAL_FILES]
    copied = []
    for src, dst in plan:
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".partial")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
            copied.append(dst)
    return copied


def cmd_install(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    sampling = {k: v for k, v in dataclasses.asdict(_sampling_from(args)).items() if v is not None}
    files = install_checkpoint(args.checkpoint, args.to)
    if getattr(args, "id", None) or sampling:
        meta = json.loads((args.to / "checkpoint.json").read_text()) if (args.to / "checkpoint.json").is_file() else {}
        checkpoint_id = getattr(args, "id", None) or meta.get("id") or args.to.resolve().name
        _write_checkpoint_json(args.to, checkpoint_id, {"sampling": {**meta.get("sampling", {}), **sampling}}
                               if sampling else {})
        if args.to / "checkpoint.json" not in files:
            files.append(args.to / "checkpoint.json")
    return {"installed": str(args.to), "files": [str(f) for f in files]}


def _write_checkpoint_json(root: Path, checkpoint_id: str, meta: dict[str, Any]) -> None:
    path = root / "checkpoint.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(meta)
    data["id"] = checkpoint_id
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def finish_demo(root: Path, meta: dict[str, Any], *, checkpoint_id: str | None = None, eval_n_per_kind: int = 16,
                eval_candidates: int = 9, seed: int = 0, install: Path | None = None) -> dict[str, Any]:
    """After training: ``root/checkpoint.json`` (id: given, else kept, else ``shapes-demo-<UTC time>``; plus
    ``meta``), evaluation into ``root/eval`` (summary in checkpoint.json), then the optional install."""
    import time

    old = root / "checkpoint.json"
    checkpoint_id = checkpoint_id or (json.loads(old.read_text()).get("id") if old.is_file() else None) \
        or time.strftime("shapes-demo-%Y%m%d-%H%M%S", time.gmtime())
    _write_checkpoint_json(root, checkpoint_id, meta)
    report: dict[str, Any] = {"checkpoint_id": checkpoint_id}
    if eval_n_per_kind > 0:
        from training.evaluate import evaluate_checkpoint, summary_lines

        ev = evaluate_checkpoint(root, n_per_kind=eval_n_per_kind, candidates=eval_candidates, seed=seed,
                                 out_dir=root / "eval")
        print("\n".join(summary_lines(ev)), file=sys.stderr)
        report["eval"] = _eval_brief(ev)
        _write_checkpoint_json(root, checkpoint_id, {"eval": {k: report["eval"][k] for k in (
            "passed", "fidelity_top", "fidelity_random", "clip_gain", "default_share", "vqgan_psnr")}})
    if install is not None:
        report["installed"] = cmd_install(argparse.Namespace(checkpoint=root, to=install, id=None))
    return report


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train VQGAN → encode → (decoder fine-tune) → DalleBart → CLIP, then :func:`finish_demo`."""
    import dataclasses
    import time

    from training.encode import encode_shapes

    root = args.out
    report: dict[str, Any] = {}
    timings: dict[str, float] = {}
    args.work_dir = None
    t0 = time.perf_counter()
    vq_dir = root / "vqgan"
    # with a decoder fine-tune, the tokens come from the base VQGAN and the final decoder goes to vqgan/
    base_dir = root / "vqgan-base" if args.vqgan_decoder_steps > 0 else vq_dir
    if not (base_dir / "flax_model.msgpack").exists():
        # a wider decoder and the palette term belong to the decoder fine-tune when there is one
        base_args = argparse.Namespace(**{**vars(args), "decoder_ch_mult": None, "palette_weight": 0.0}) \
            if args.vqgan_decoder_steps > 0 else args
        report["vqgan"] = cmd_vqgan(base_args, base_dir, args.vqgan_steps)
    timings["vqgan"] = time.perf_counter() - t0
    shards = root / "tokens"
    if not (shards.is_dir() and any(shards.glob("*.parquet"))):
        encode_shapes(base_dir, shards, num_images=args.num_images, seed=args.data_seed, mesh=_mesh(args),
                      progress=not args.no_progress)
    timings["encode"] = time.perf_counter() - t0 - sum(timings.values())
    if args.vqgan_decoder_steps > 0 and not (vq_dir / "flax_model.msgpack").exists():
        ft = argparse.Namespace(**{**vars(args), "init_from": base_dir, "decoder_only": True,
                                   "lr": args.lr if args.lr is not None else 1e-3})
        report["vqgan_decoder"] = cmd_vqgan(ft, vq_dir, args.vqgan_decoder_steps)
    timings["vqgan_decoder"] = time.perf_counter() - t0 - sum(timings.values())
    args.vqgan = base_dir
    report["dallebart"] = cmd_dallebart(args, shards, root / "dallebart", args.dallebart_steps)
    timings["dallebart"] = time.perf_counter() - t0 - sum(timings.values())
    report["clip"] = cmd_clip(args, root / "clip", args.clip_steps)
    timings["clip"] = time.perf_counter() - t0 - sum(timings.values())
    if not (root / "safety.json").exists():  # the demo's stand-in concept (see the file's note)
        import shutil

        shutil.copyfile(Path(__file__).parent / "data" / "demo_safety.json", root / "safety.json")
    meta = {"dataset": "procedural shapes", "data_seed": args.data_seed, "num_images": args.num_images,
            "steps": {"vqgan": args.vqgan_steps, "vqgan_decoder": args.vqgan_decoder_steps,
                      "dallebart": args.dallebart_steps, "clip": args.clip_steps}}
    sampling = {k: v for k, v in dataclasses.asdict(_sampling_from(args)).items() if v is not None}
    if sampling:
        meta["sampling"] = sampling
    report.update(finish_demo(root, meta, checkpoint_id=args.id, eval_n_per_kind=args.eval_n_per_kind,
                              eval_candidates=args.eval_candidates, seed=args.seed, install=args.install))
    timings["evaluate_install"] = time.perf_counter() - t0 - sum(timings.values())
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    total = time.perf_counter() - t0
    report["total_s"] = round(total, 1)
    print(f"demo: {total / 60:.1f} min on this machine ("
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + ")", file=sys.stderr)
    (root / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def cmd_feedback(args: argparse.Namespace) -> dict[str, Any]:
    """``export`` (votes, reports and decisions of consenting users → ``--out``, see ``training.feedback``) and the
    registry actions of :mod:`training.retrain`."""
    if not args.database_url:
        raise ValueError("no database: give --database-url or set DATABASE_URL")
    if args.action == "export":
        from training.feedback import export_from_url

        if args.out is None:
            raise ValueError("export needs --out DIR")
        return export_from_url(args.database_url, args.out, holdout=args.holdout,
                               max_pairs_per_prompt=args.max_pairs_per_prompt)
    from training.feedback_cli import run_action

    return run_action(args)


def cmd_bias_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The end-to-end demonstration lives with the benchmarks (it drives the bot, which training never imports):
    run it as its own process, its output passed through."""
    import subprocess

    cmd = [sys.executable, "-m", "bench", "bias_demo", "--out", str(args.out), *getattr(args, "rest", [])]
    code = subprocess.call(cmd)
    if code != 0:
        raise ValueError(f"bias-demo failed (exit {code})")
    return {"report": str(args.out / "report.json")}


COMMANDS = {"vqgan": cmd_vqgan, "encode": cmd_encode, "dallebart": cmd_dallebart, "clip": cmd_clip,
            "demo": cmd_demo, "evaluate": cmd_evaluate, "install": cmd_install, "feedback": cmd_feedback,
            "bias-demo": cmd_bias_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bias-demo":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bias-demo":  # its own options are the benchmark's
        args.rest = [*unknown, *args.rest]
    try:
        report = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
