"""Retraining from feedback, as an admin runs it: export → fine-tune → evaluate (the gate) → promote → rollback,
every step recorded in the store's model registry (``checkpoints``, ``training_runs``).

- a checkpoint is a row: id (its ``checkpoint.json`` id), path, parent, status, metrics (the fine-tune's summary,
  ``training_run``, ``data`` — the export's directory and manifest hash —, the gate's report);
- **finetune** opens a training run (``running``), trains in this process's main thread (Ctrl-C or SIGTERM stop it:
  the run becomes ``cancelled``, its state is kept for a resume, and no checkpoint row or directory appears), then
  registers the finished directory as a ``candidate`` and closes the run ``done``;
- **evaluate** measures parent and candidate on the same prompts and seeds (:mod:`training.gate`), writes
  ``gate.json`` next to the candidate and records the verdict; a candidate the gate rejects becomes ``rejected``
  (with its report), and a rejected one that a later run passes is a ``candidate`` again;
- **promote** makes a candidate the gate passed ``active`` (``--force`` overrides a rejection, and says so) and tells
  each engine service to load it (``POST /admin/reload``, one service after the other, so the others keep serving);
- **rollback** makes the active checkpoint's parent active again (never one the gate rejected, whether ``rejected``
  or force-promoted and since retired: it goes further up) and reloads it the same way; if another promotion made a
  different checkpoint active meanwhile, it refuses and changes nothing.

Every change of the served model is audited (``model_train``, ``model_promote``, ``model_rollback``,
``model_reject`` moderation actions, in the same transaction as the change): by the admin whose ``/dalle-admin
model`` command ran it (``--actor``, ``--guild``), else by the operator (:data:`store.models.OPERATOR_MODERATOR`),
the parent a fine-tune activates because nothing was active included; the gate's verdicts (a rejection, or one
withdrawn by a passing re-run) by the bot itself (:data:`store.models.SYSTEM_MODERATOR`).

The bot's processes never import this: ``/dalle-admin model`` starts ``python -m training feedback ...`` as its own
process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from store.models import OPERATOR_MODERATOR, SYSTEM_MODERATOR, CheckpointStatus, ModAction, Status
from store.repo.registry import ActiveChanged, gate_passed
from store.repository import ModelAudit

OPERATOR = ModelAudit(OPERATOR_MODERATOR)

GATE_FILE = "gate.json"
MEASURE_FILE = "measure-{key}.json"


def checkpoint_id_of(directory: Path) -> str:
    meta = directory / "checkpoint.json"
    if meta.is_file():
        cid = json.loads(meta.read_text()).get("id")
        if cid:
            return str(cid)
    return directory.resolve().name


def describe(row: Any) -> dict[str, Any]:
    m = row.metrics or {}
    gate = m.get("gate") or {}
    return {"id": row.id, "status": row.status, "parent": row.parent_id, "path": row.path,
            "created_at": row.created_at.isoformat(timespec="seconds") if row.created_at else None,
            "training_run": m.get("training_run"), "data": (m.get("data") or {}).get("content_sha256"),
            "gate": None if not gate else ("passed" if gate.get("promote") else "rejected"),
            "forced": bool(m.get("forced")),
            "bias": (m.get("measure") or {}).get("bias_share"), "fidelity": (m.get("measure") or {}).get("fidelity")}


async def ensure_registered(repo: Any, directory: Path, *, parent_id: str | None = None,
                            activate_if_none: bool = True, by: ModelAudit = OPERATOR) -> Any:
    """The registry row of checkpoint ``directory`` (registered now if new; active if nothing is, unless the gate
    turned it down). Activating it changes the served model, so it is audited (``model_promote``) by ``by``: who asked
    for what needed it (the operator by default; :data:`store.models.SYSTEM_MODERATOR` for the bot's own calls);
    if something became active meanwhile, that one stays."""
    cid = checkpoint_id_of(directory)
    row = await repo.get_checkpoint(cid)
    if row is None:
        row = await repo.register_checkpoint(cid, str(directory.resolve()), parent_id=parent_id)
    if activate_if_none and gate_passed(row) is not False and await repo.get_active_checkpoint() is None:
        try:
            row = await repo.set_active_checkpoint(cid, by=by, action=ModAction.MODEL_PROMOTE, expect_active=None,
                                                   note="registered while nothing was active")
        except ActiveChanged:
            row = await repo.get_checkpoint(cid)
    return row


class Cancelled(Exception):
    """The fine-tune stopped before it finished (Ctrl-C, SIGTERM)."""


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (a cancel from ``/dalle-admin model``) stops training like Ctrl-C: state saved, nothing exported."""
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        return None


def finetune_registered(database_url: str, parent: Path, data: Path, out: Path, *, by: ModelAudit | None = None,
                        **kw: Any) -> dict[str, Any]:
    """:func:`training.preference.finetune` inside a registry training run (see the module's note); its start (and
    the parent's activation when nothing was active) is audited (``model_train``, ``model_promote``) by ``by``
    (default the operator)."""
    from store.repository import Repository
    from training.preference import finetune

    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file() else None
    if manifest is None:
        raise FileNotFoundError(f"{data}: no manifest.json (run `python -m training feedback export` first)")
    cfg = kw.get("cfg")
    config = {"parent": str(parent), "data": str(data), "out": str(out),
              **{k: v for k, v in kw.items()
                 if k in ("steps", "batch_size", "lr", "seed", "trainable", "counterfactuals")},
              "objective": dict(cfg.__dict__) if cfg is not None else None}

    async def start() -> tuple[str, int]:
        repo = Repository.from_url(database_url)
        try:
            row = await ensure_registered(repo, parent, by=by or OPERATOR)
            run = await repo.create_training_run("feedback", config=config, input_checkpoint_id=row.id,
                                                 log_path=str(out.with_name(out.name + "-train") / "metrics.jsonl"),
                                                 by=by or OPERATOR)
            return row.id, run.id
        finally:
            await repo.close()

    parent_id, run_id = asyncio.run(start())
    previous = _sigterm_as_interrupt()
    status, result, error = Status.FAILED.value, None, None
    try:
        result = finetune(parent, data, out, checkpoint_id=kw.pop("checkpoint_id", None) or out.name,
                          **{k: v for k, v in kw.items() if k != "checkpoint_id"})
        status = Status.CANCELLED.value if result.interrupted else Status.DONE.value
    except KeyboardInterrupt:
        status = Status.CANCELLED.value
    except Exception as exc:
        error = f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        asyncio.run(_finish(database_url, run_id, status, parent_id, out, manifest, data, result, error))
    if status == Status.CANCELLED.value:
        raise Cancelled(f"training run {run_id} cancelled at step {result.steps if result else '?'}; the same "
                        f"command resumes it")
    assert result is not None
    return {"training_run": run_id, "checkpoint": checkpoint_id_of(out), "parent": parent_id, "out": str(out),
            "steps": result.steps, "last": result.summary.get("last")}


async def _finish(database_url: str, run_id: int, status: str, parent_id: str, out: Path, manifest: dict,
                  data: Path, result: Any, error: str | None) -> None:
    from store.repository import Repository

    repo = Repository.from_url(database_url)
    try:
        metrics: dict[str, Any] = {"steps": result.steps if result else None}
        if error:
            metrics["error"] = error
        if status != Status.DONE.value:
            await repo.finish_training_run(run_id, status, metrics=metrics)
            return
        cid = checkpoint_id_of(out)
        await repo.register_checkpoint(cid, str(out.resolve()), parent_id=parent_id, metrics={
            "training_run": run_id, "finetune": result.summary,
            "data": {"dir": str(data.resolve()), "content_sha256": manifest.get("content_sha256"),
                     "counts": manifest.get("counts")}})
        await repo.finish_training_run(run_id, status, metrics={**metrics, **(result.summary.get("last") or {})},
                                       output_checkpoint_id=cid)
    finally:
        await repo.close()


def _measure_cached(directory: Path, seeds: Sequence[int], n_per_kind: int, candidates: int,
                    cache: Path) -> dict[str, Any]:
    """:func:`training.gate.measure` of a checkpoint, kept in ``cache`` (so a parent is measured once for all the
    candidates beside each other, and nothing is written into the parent's own directory)."""
    from engine.pipeline import load_pipeline
    from training.gate import measure

    key = f"{checkpoint_id_of(directory)}-s{'-'.join(map(str, seeds))}-n{n_per_kind}-c{candidates}"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / MEASURE_FILE.format(key=key)
    if path.is_file():
        return json.loads(path.read_text())
    m = measure(load_pipeline(directory), seeds=seeds, n_per_kind=n_per_kind, candidates=candidates,
                progress=lambda seed, s: print(f"  {directory.name} seed {seed}: fidelity {s['fidelity']:.3f}, "
                                               f"red {s['bias_share']}, adherence {s['colour_adherence']}",
                                               file=sys.stderr))
    path.write_text(json.dumps(m, indent=2) + "\n")
    return m


def gate_candidate(candidate: Path, parent: Path, data: Path | None, *, seeds: Sequence[int] = (0, 1),
                   n_per_kind: int = 8, candidates: int = 9, kl_budget: float | None = None) -> dict[str, Any]:
    """Measure both, decide, and write ``candidate/gate.json`` (the report an admin reads either way)."""
    from training.gate import GatePolicy, decide, kl_to_parent

    policy = GatePolicy() if kl_budget is None else GatePolicy(kl_budget=kl_budget)
    cache = candidate.resolve().parent / ".gate-cache"
    pm = _measure_cached(parent, seeds, n_per_kind, candidates, cache)
    cm = _measure_cached(candidate, seeds, n_per_kind, candidates, cache)
    kl = kl_to_parent(parent, candidate, data) if data is not None else None
    verdict = decide(pm, cm, kl["kl"] if kl else None, policy)
    report = {"candidate": checkpoint_id_of(candidate), "parent": checkpoint_id_of(parent), **verdict, "kl": kl,
              "parent_metrics": _brief(pm), "candidate_metrics": _brief(cm)}
    (candidate / GATE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    from training.gate import interval

    keys = ("fidelity", "fidelity_mean_candidate", "bias_share", "dominant_share", "tv_to_uniform",
            "colour_adherence", "none_share")
    # a measurement cached before a key was summarised still has the per-seed values
    return {**{k: m[k] if k in m else interval([s.get(k) for s in m.get("per_seed", [])]) for k in keys},
            "shares": m["shares"], "seeds": m["seeds"]}


async def record_gate(repo: Any, report: dict[str, Any], *, guild_id: int | None = None) -> Any:
    """Store the verdict on the candidate's row; a candidate the gate rejects becomes ``rejected``, and a rejected
    one it passes (a re-run) a ``candidate`` again; both audited (``model_reject``) as the bot's own action
    (``guild_id``: the guild whose admin started the training)."""
    cid = report["candidate"]
    measure = {k: (v.get("mean") if isinstance(v, dict) else v) for k, v in report["candidate_metrics"].items()
               if k in ("fidelity", "bias_share", "tv_to_uniform", "colour_adherence")}
    metrics = {"gate": {k: report[k] for k in ("promote", "checks", "policy")},
               "kl": (report.get("kl") or {}).get("kl"), "measure": measure}
    by = ModelAudit(SYSTEM_MODERATOR, guild_id)
    if report["promote"]:
        return await repo.reinstate_checkpoint(cid, metrics, by=by, reason="the gate passed it on a re-run")
    failed = [c.get("name", "?") for c in report.get("checks") or [] if not c.get("pass")]
    return await repo.reject_checkpoint(cid, metrics, by=by,
                                        reason="the gate rejected it" + (f" ({', '.join(failed)})" if failed else ""))


async def reload_engines(urls: Sequence[str], token: str | None, path: str) -> list[dict[str, Any]]:
    """Each engine service loads ``path``, one after the other (the rest keep serving meanwhile)."""
    from engine.client import HttpEngine

    done = []
    for url in urls:
        engine = HttpEngine(url, token)
        try:
            info = await engine.reload(path)
            done.append({"url": url, "checkpoint_id": info.checkpoint_id})
        finally:
            await engine.close()
    return done


async def promote(repo: Any, checkpoint_id: str, *, force: bool = False, by: ModelAudit | None = None) -> Any:
    """Make ``checkpoint_id`` active (the gate must have passed it unless ``force``); audited (``model_promote``)
    by ``by`` (default the operator), with the override named when ``force`` was needed."""
    row = await repo.get_checkpoint(checkpoint_id)
    if row is None:
        raise ValueError(f"checkpoint {checkpoint_id!r} is not registered")
    passed = gate_passed(row)
    if not force and not passed:
        why = "was rejected by the gate" if passed is False else "has not been evaluated"
        raise ValueError(f"checkpoint {checkpoint_id!r} {why}; run `feedback evaluate` (or promote --force)")
    if row.status == CheckpointStatus.ACTIVE.value:
        raise ValueError(f"checkpoint {checkpoint_id!r} is already active")
    if not Path(row.path).is_dir():
        raise ValueError(f"checkpoint {checkpoint_id!r}: its directory {row.path} is gone")
    note = None
    if force and not passed:
        note = "forced: " + ("the gate rejected it" if passed is False else "not evaluated by the gate")
    return await repo.set_active_checkpoint(checkpoint_id, force=force, by=by or OPERATOR,
                                            action=ModAction.MODEL_PROMOTE, note=note)


async def rollback(repo: Any, *, by: ModelAudit | None = None) -> tuple[Any, Any]:
    """The active checkpoint's parent becomes active again (an ancestor the gate turned down, ``rejected`` or a
    forced one since retired, is passed over: rollback never serves it); audited (``model_rollback``) by ``by``
    (default the operator). The activation checks, in its own transaction, that the active checkpoint is still the
    one read here (else ValueError, nothing changed). Returns (the row now active, the row rolled back)."""
    active = await repo.get_active_checkpoint()
    if active is None:
        raise ValueError("no checkpoint is active")
    if active.parent_id is None:
        raise ValueError(f"checkpoint {active.id!r} has no parent to roll back to")
    parent, skipped, seen = await repo.get_checkpoint(active.parent_id), [], {active.id}
    while parent is not None and gate_passed(parent) is False and parent.parent_id and parent.id not in seen:
        seen.add(parent.id)
        skipped.append(parent.id)
        parent = await repo.get_checkpoint(parent.parent_id)
    if parent is None or gate_passed(parent) is False or parent.id in seen:
        raise ValueError(f"checkpoint {active.id!r} has no parent to roll back to that the gate did not reject")
    if not Path(parent.path).is_dir():
        raise ValueError(f"the parent {parent.id!r} is not available")
    # "(was X)" in the reason is what the activation retired; expect_active makes it the same X as here
    note = f"rolled back from {active.id}" + (f", passing over rejected {', '.join(skipped)}" if skipped else "")
    try:
        row = await repo.set_active_checkpoint(parent.id, by=by or OPERATOR, action=ModAction.MODEL_ROLLBACK,
                                               note=note, expect_active=active.id)
    except ActiveChanged as exc:
        raise ValueError(f"rollback from {active.id!r} refused: {exc}; run rollback again to roll back from the "
                         "checkpoint active now") from exc
    return row, active
