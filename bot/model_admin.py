"""``/dalle-admin model list|train|status|cancel|promote|rollback``: retraining from feedback, for admins.

The bot never trains, and never imports ``training``: ``train`` starts ``python -m training feedback export``, then
``finetune`` and ``evaluate`` (the gate), each as its own process, one after the other, in the background; its
progress (stage, step of steps) is read from the fine-tune's ``metrics.jsonl``; ``cancel`` sends SIGTERM (the
fine-tune stops like Ctrl-C, its training run is marked cancelled and no checkpoint is registered). ``promote`` and
``rollback`` run the same CLI (the registry's rules in one place) and then swap the engine this bot uses
(``Engine.reload``: between passes, no job lost; several services one after the other).

Who may: ``list`` and ``status`` any admin of the guild (Manage Server); ``train``, ``cancel``, ``promote`` and
``rollback`` change the model for every guild, so also only the bot's operator (its Discord application's owner).

Audited: the CLI is told who asked (``--actor`` the admin's user id, ``--guild`` the server), so the training run's
start, the promotion and the rollback are recorded (``model_train``, ``model_promote``, ``model_rollback``) in the
same transaction as the change, naming the admin; the gate's rejection is the bot's own (``model_reject``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.admin import NotAdmin


class NotOperator(PermissionError):
    def __init__(self) -> None:
        super().__init__("Only the bot's operator can train, promote or roll back the model (it serves every "
                         "server).")


@dataclass(frozen=True)
class ModelActor:
    user_id: int
    guild_id: int | None
    can_manage_guild: bool
    is_operator: bool


@dataclass
class TrainingJob:
    """The one background training job: its stages run as processes, one at a time."""

    run_dir: Path
    steps: int
    started: float = field(default_factory=time.monotonic)
    stage: str = "starting"
    state: str = "running"  # running / done / failed / cancelled
    message: str = ""
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    cancelled: bool = False
    result: dict[str, Any] = field(default_factory=dict)

    def progress(self) -> str:
        step = None
        metrics = self.run_dir / "candidate-train" / "metrics.jsonl"
        if self.stage == "finetune" and metrics.is_file():
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = metrics.read_text().strip().splitlines()
                step = json.loads(lines[-1]).get("step") if lines else None
        done = f" (step {step} of {self.steps})" if step is not None else ""
        took = int(time.monotonic() - self.started)
        return f"{self.state}: {self.stage}{done}, {took // 60} min {took % 60} s" + \
            (f" — {self.message}" if self.message else "")


class ModelAdmin:
    """See the module's note. ``command``: how to start the training CLI (default this Python, ``-m training``)."""

    def __init__(self, repo: Any, engine: Any, *, database_url: str, runs_dir: Path,
                 command: tuple[str, ...] | None = None, env: dict[str, str] | None = None) -> None:
        self.repo = repo
        self.engine = engine
        self.database_url = database_url
        self.runs_dir = Path(runs_dir)
        self.command = command or (sys.executable, "-m", "training")
        self.env = env
        self.job: TrainingJob | None = None

    @staticmethod
    def _admin(actor: ModelActor) -> None:
        if actor.guild_id is None or not actor.can_manage_guild:
            raise NotAdmin()

    def _operator(self, actor: ModelActor) -> None:
        self._admin(actor)
        if not actor.is_operator:
            raise NotOperator()

    async def list(self, actor: ModelActor) -> str:
        self._admin(actor)
        rows = await self.repo.list_checkpoints()
        if not rows:
            return "No checkpoints are registered yet (the first training registers the serving one)."
        lines = ["**Checkpoints** (newest last)"]
        for row in rows[-15:]:
            m = row.metrics or {}
            status = row.status + (" (forced past the gate)" if m.get("forced") else "")
            measure = m.get("measure") or {}
            extra = ""
            if measure:
                extra = (f" · red {100 * (measure.get('bias_share') or 0):.0f}% · fidelity "
                         f"{100 * (measure.get('fidelity') or 0):.0f}%")
            parent = f" · parent `{row.parent_id}`" if row.parent_id else ""
            lines.append(f"`{row.id}` — {status}{parent}{extra}")
        return "\n".join(lines)

    async def _cli(self, actor: ModelActor, *args: str) -> dict[str, Any]:
        who = ("--actor", str(actor.user_id)) + (("--guild", str(actor.guild_id)) if actor.guild_id else ())
        proc = await asyncio.create_subprocess_exec(
            *self.command, "feedback", *args, "--database-url", self.database_url, *who,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self._env())
        if self.job is not None and self.job.state == "running":
            self.job.process = proc
        out, err = await proc.communicate()
        if proc.returncode != 0:
            last = (err.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            raise ValueError(last.removeprefix("error: "))
        return json.loads(out.decode() or "{}")

    def _env(self) -> dict[str, str]:
        env = dict(self.env if self.env is not None else os.environ)
        env.pop("ENGINE_URLS", None)  # the bot swaps its own engine after a promotion
        return env

    async def train(self, actor: ModelActor, *, steps: int = 60) -> str:
        self._operator(actor)
        if not 1 <= steps <= 5000:
            raise ValueError("steps must be between 1 and 5000.")
        if self.job is not None and self.job.state == "running":
            raise ValueError(f"A training job is already running ({self.job.progress()}).")
        run_dir = self.runs_dir / time.strftime("feedback-%Y%m%d-%H%M%S", time.gmtime())
        run_dir.mkdir(parents=True, exist_ok=True)
        self.job = TrainingJob(run_dir, steps)
        self.job.task = asyncio.get_running_loop().create_task(self._run(self.job, actor), name="model-training")
        return f"Training started in `{run_dir.name}`: export → fine-tune ({steps} steps) → evaluate. " \
               "`/dalle-admin model status` shows its progress, `/dalle-admin model cancel` stops it."

    async def _run(self, job: TrainingJob, actor: ModelActor) -> None:
        try:
            job.stage = "export"
            await self._cli(actor, "export", "--out", str(job.run_dir / "data"))
            job.stage = "finetune"
            ft = await self._cli(actor, "finetune", "--data", str(job.run_dir / "data"), "--out",
                                 str(job.run_dir / "candidate"), "--id", job.run_dir.name, "--steps",
                                 str(job.steps), "--no-progress")
            if job.cancelled or "cancelled" in ft:
                job.state, job.message = "cancelled", "stopped; nothing was registered"
                return
            job.stage = "evaluate"
            gate = await self._cli(actor, "evaluate", "--checkpoint", str(job.run_dir / "candidate"), "--data",
                                   str(job.run_dir / "data"))
            job.result = gate
            job.state = "done"
            job.message = (f"`{job.run_dir.name}` passed the gate: `/dalle-admin model promote` it"
                           if gate.get("promote") else f"`{job.run_dir.name}` was rejected by the gate (report: "
                           "gate.json)")
        except ValueError as exc:
            job.state = "cancelled" if job.cancelled else "failed"
            job.message = "stopped; nothing was registered" if job.cancelled else str(exc)
        finally:
            job.process = None

    async def status(self, actor: ModelActor) -> str:
        self._admin(actor)
        if self.job is None:
            return "No training job has run since the bot started."
        return f"Training `{self.job.run_dir.name}`: {self.job.progress()}"

    async def cancel(self, actor: ModelActor) -> str:
        self._operator(actor)
        job = self.job
        if job is None or job.state != "running":
            raise ValueError("No training job is running.")
        job.cancelled = True
        if job.process is not None and job.process.returncode is None:
            job.process.send_signal(signal.SIGTERM)
        if job.task is not None:
            await asyncio.wait({job.task}, timeout=120)
        return f"Training `{job.run_dir.name}`: {job.progress()}"

    async def promote(self, actor: ModelActor, checkpoint_id: str) -> str:
        self._operator(actor)
        done = await self._cli(actor, "promote", "--checkpoint", checkpoint_id)
        info = await self.engine.reload(done["path"])
        return f"`{done['active']}` is now active; the engine serves `{info.checkpoint_id}`."

    async def rollback(self, actor: ModelActor) -> str:
        self._operator(actor)
        done = await self._cli(actor, "rollback")
        info = await self.engine.reload(done["path"])
        return f"Rolled back from `{done['rolled_back']}` to `{done['active']}`; the engine serves " \
               f"`{info.checkpoint_id}`."
