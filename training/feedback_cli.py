"""``python -m training feedback finetune|evaluate|promote|rollback|list``: the registry actions of
:mod:`training.retrain` behind the command line (``export`` stays in :mod:`training.feedback`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from training import retrain


def _check_database(url: str) -> None:
    from store.db import DatabaseUnavailable, MigrationRequired, ensure_migrated, parse_url

    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        raise ValueError(f"no database file at {parsed.database}")
    try:
        ensure_migrated(url, auto=False)
    except (MigrationRequired, DatabaseUnavailable) as exc:
        raise ValueError(str(exc)) from None


async def _with_repo(url: str, fn: Any) -> Any:
    from store.repository import Repository

    repo = Repository.from_url(url)
    try:
        return await fn(repo)
    finally:
        await repo.close()


def _by(args: argparse.Namespace) -> Any:
    """Who the audit rows name: ``--actor`` (the admin whose ``/dalle-admin model`` command runs this) in
    ``--guild``, else the operator at the command line."""
    from store.models import OPERATOR_MODERATOR
    from store.repository import ModelAudit

    actor = getattr(args, "actor", None)
    return ModelAudit(OPERATOR_MODERATOR if actor is None else actor, getattr(args, "guild", None))


def _engine_urls(args: argparse.Namespace) -> list[str]:
    if args.engine_url:
        return list(args.engine_url)
    return [u.strip() for u in (os.environ.get("ENGINE_URLS") or "").split(",") if u.strip()]


async def _active_path(repo: Any) -> Path:
    row = await repo.get_active_checkpoint()
    if row is None:
        raise ValueError("no active checkpoint is registered: give --parent DIR")
    return Path(row.path)


def run_action(args: argparse.Namespace) -> dict[str, Any]:
    url = args.database_url
    _check_database(url)
    action = args.action
    if action == "list":
        rows = asyncio.run(_with_repo(url, lambda repo: repo.list_checkpoints()))
        return {"checkpoints": [retrain.describe(r) for r in rows]}
    if action == "finetune":
        from training.preference import PreferenceConfig

        if args.data is None or args.out is None:
            raise ValueError("finetune needs --data (an export) and --out (the new checkpoint directory)")
        parent = args.parent or asyncio.run(_with_repo(url, _active_path))
        if not (parent / "dallebart").is_dir():
            raise FileNotFoundError(f"{parent}: no dallebart/ (is this a checkpoint directory?)")
        cfg = PreferenceConfig(beta=args.beta, sft_weight=args.sft_weight, desirable_weight=args.desirable_weight,
                               undesirable_weight=args.undesirable_weight,
                               token_kl_weight=args.token_kl_weight,
                               token_kl_scope=getattr(args, "token_kl_scope", "all"),
                               reward_scope=getattr(args, "reward_scope", "all"),
                               temperature=getattr(args, "objective_temperature", 1.0),
                               guidance=getattr(args, "objective_guidance", 1.0),
                               kto_reference=getattr(args, "kto_reference", "batch"))
        cfg.validate()
        try:
            return retrain.finetune_registered(url, parent, args.data, args.out, by=_by(args), cfg=cfg,
                                               steps=args.steps,
                                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                               checkpoint_id=args.id, progress=not args.no_progress,
                                               trainable=args.trainable,
                                               counterfactuals=getattr(args, "counterfactuals", 0))
        except retrain.Cancelled as exc:
            print(f"cancelled: {exc}", file=sys.stderr)
            return {"cancelled": str(exc)}
    if action == "evaluate":
        if args.checkpoint is None:
            raise ValueError("evaluate needs --checkpoint (the candidate's directory)")
        cand = Path(args.checkpoint)
        if not cand.is_dir():
            raise FileNotFoundError(f"{cand}: no such checkpoint directory")

        async def parent_of(repo: Any) -> Path:
            row = await repo.get_checkpoint(retrain.checkpoint_id_of(cand))
            if row is None or row.parent_id is None:
                raise ValueError(f"{cand}: not registered with a parent; give --parent DIR")
            parent = await repo.get_checkpoint(row.parent_id)
            return Path(parent.path)

        parent = args.parent or asyncio.run(_with_repo(url, parent_of))
        report = retrain.gate_candidate(cand, parent, args.data, seeds=args.seeds, n_per_kind=args.n_per_kind,
                                        candidates=args.candidates, kl_budget=args.kl_budget)
        asyncio.run(_with_repo(url, lambda repo: _record_if_registered(repo, report, _by(args).guild_id)))
        for c in report["checks"]:
            print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['name']}: {c['detail']}", file=sys.stderr)
        return {"candidate": report["candidate"], "promote": report["promote"],
                "report": str(cand / retrain.GATE_FILE)}
    if action == "promote":
        if args.checkpoint is None:
            raise ValueError("promote needs --checkpoint ID")

        async def go(repo: Any) -> dict[str, Any]:
            row = await retrain.promote(repo, args.checkpoint, force=args.force, by=_by(args))
            reloaded = await retrain.reload_engines(_engine_urls(args), os.environ.get("ENGINE_TOKEN"), row.path)
            return {"active": row.id, "path": row.path, "reloaded": reloaded}

        return asyncio.run(_with_repo(url, go))
    if action == "rollback":
        async def back(repo: Any) -> dict[str, Any]:
            row, old = await retrain.rollback(repo, by=_by(args))
            reloaded = await retrain.reload_engines(_engine_urls(args), os.environ.get("ENGINE_TOKEN"), row.path)
            return {"active": row.id, "rolled_back": old.id, "path": row.path, "reloaded": reloaded}

        return asyncio.run(_with_repo(url, back))
    raise ValueError(f"unknown action {action!r}")


async def _record_if_registered(repo: Any, report: dict[str, Any], guild_id: int | None) -> None:
    if await repo.get_checkpoint(report["candidate"]) is not None:
        await retrain.record_gate(repo, report, guild_id=guild_id)
