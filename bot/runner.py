"""The workers: take a job from the fair queue, claim it in the database, hand it to the engine (forwarding its
progress and watching for a stalled engine), store the images (PNG files and rows), then hand the result over to
be posted. Also publishes queue positions as progress while jobs wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.blocklist import phash_png
from bot.leases import Leases
from bot.outcome import Outcome, ProgressUpdate, Publisher, StoredImage, is_withheld
from bot.ratelimit import human_duration
from bot.retry import while_unreachable
from bot.scheduler import Scheduler, SchedulerClosed
from bot.variations import variation_prefix
from engine.api import BadRequest, Engine, EngineError, GenerationRequest, GenerationResult, RequestCancelled
from store.models import CaseSource, FlaggedMode, Status
from store.repository import NewImage, Repository, TakenOver

log = logging.getLogger(__name__)


class Runner:
    def __init__(
        self,
        repo: Repository,
        engine: Engine,
        scheduler: Scheduler,
        publisher: Publisher | None,
        leases: Leases,
        *,
        run_nonce: str,
        positions_changed: asyncio.Event,
        flagged_mode: Callable[[int | None], Awaitable[str]],
        output_dir: str | Path = "outputs",
        concurrency: int,
        progress_interval: float,
        engine_stall_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo = repo
        self.engine = engine
        self.scheduler = scheduler
        self.publisher = publisher
        self.leases = leases
        # in engine request ids: another bot (or this one on a fresh database) numbers its jobs from 1 too, and an
        # engine service remembers ids for result_ttl; a clash would be refused as a duplicate request
        self.run_nonce = run_nonce
        self.positions_changed = positions_changed
        self.flagged_mode = flagged_mode  # the guild's flagged_mode: whether its flagged images are withheld
        self.output_dir = Path(output_dir)
        self.concurrency = concurrency
        self.progress_interval = progress_interval
        # a job whose engine event stream says nothing for this long (no queue move, no tokens) is given up:
        # cancelled on the engine and failed, so a hung model thread does not hold it, and its user, forever.
        # Longer than one sampling pass (a job queued in the engine waits a whole pass between events). 0: off.
        self.engine_stall_timeout = engine_stall_timeout
        self.retry_delay = 0.5  # seconds before the first retry of a failed database claim (doubling)
        # while the database is unreachable (a restart, a failover), claims and results are tried again for this
        # long: the images are in hand, and a job left running would otherwise wait for its lease to run out
        self.unreachable_retry_s = 60.0
        self.clock = clock
        self.running: dict[int, asyncio.Task] = {}
        self._workers: list[asyncio.Task] = []
        self._turns = _Turns()
        self._position_task: asyncio.Task | None = None
        self._engine_ids: dict[int, str] = {}
        self._last_positions: dict[int, int] = {}
        self.blocklist: Any = None  # bot.blocklist.BlocklistService: near-duplicates of blocked hashes are withheld

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._turns = _Turns()
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"dalle-worker-{i}") for i in range(self.concurrency)
        ]
        self._position_task = asyncio.create_task(self._position_loop(), name="dalle-positions")

    async def finish_running(self, grace: float) -> None:
        """Let running jobs finish within ``grace`` seconds, else cancel them: each goes back to the queue (status
        queued) for the next start. The step that stores images and marks a job done is shielded, so nothing is
        left half-recorded."""
        running = list(self.running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def stop(self) -> None:
        """End the workers (the scheduler is closed: idle ones return) and the position updates."""
        _, stuck = await asyncio.wait(self._workers, timeout=5.0) if self._workers else (set(), set())
        for w in stuck:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._position_task is not None:
            self._position_task.cancel()
            await asyncio.gather(self._position_task, return_exceptions=True)
            self._position_task = None

    # -- progress ------------------------------------------------------------------------------------

    async def _position_loop(self) -> None:
        """One task publishes queue positions after dispatches, coalescing bursts of them into one pass."""
        while True:
            await self.positions_changed.wait()
            self.positions_changed.clear()
            try:
                await self._notify_positions()
            except Exception:  # noqa: BLE001 - progress is best effort
                log.warning("queue position updates failed", exc_info=True)

    async def _notify_positions(self) -> None:
        if self.publisher is None:
            return
        positions = self.scheduler.positions()
        changed = {gid: p for gid, p in positions.items() if self._last_positions.get(gid) != p}
        self._last_positions = positions
        for gid, pos in changed.items():
            await asyncio.sleep(0)  # a long backlog of expired tokens never awaits below: let the loop breathe
            job = self.scheduler.job(gid)
            gen = job.payload if job is not None else None
            if gen is None:  # restored at start-up: read the row once
                gen = await self.repo.get_generation(gid, with_images=False)
                if job is not None:
                    job.payload = gen
            if gen is not None and self.scheduler.is_queued(gid):  # still queued after the awaits
                await self._progress(gen, ProgressUpdate(gid, "queued", position=pos))

    async def _progress(self, gen: Any, update: ProgressUpdate) -> None:
        if self.publisher is None:
            return
        try:
            await self.publisher.progress(gen, update)
        except Exception:  # noqa: BLE001 - progress is best effort
            log.warning("progress update for %s failed", update.generation_id, exc_info=True)

    # -- running -------------------------------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        while not self.scheduler.closed:
            try:
                job = await self.scheduler.next()
            except SchedulerClosed:
                return
            if self.scheduler.closed:  # not claimed: it stays queued in the database for the next start
                self.scheduler.done(job.id)
                return
            self.positions_changed.set()  # told by the position task: the worker goes straight to the engine
            task = asyncio.create_task(self._run_job(job.id, self._turns.take()))
            self.running[job.id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if self.scheduler.closed:
                    raise
            except Exception:  # noqa: BLE001 - one job's bug must not kill the worker
                log.exception("generation %s crashed", job.id)
            finally:
                self.running.pop(job.id, None)
                self.scheduler.done(job.id)

    async def _run_job(self, generation_id: int, turn: int | None = None) -> None:
        """Claim, hand to the engine in dispatch order (``turn``), await the result, store it, publish it."""
        turns = self._turns
        gen = None
        try:
            gen = await self._claim(generation_id)
        finally:
            if gen is None and turn is not None:  # no engine submit follows: let the next ticket go
                turns.finish(turn)
        if gen is None:  # cancelled (or taken by another process) meanwhile
            return
        request = GenerationRequest(prompt=gen.prompt, n=gen.n_images, seed=int(gen.seed),
                                    request_id=f"gen-{gen.id}-{gen.attempts}-{self.run_nonce}")
        try:
            try:
                request = dataclasses.replace(request, image_prefix=await self._image_prefix(gen))
                if turn is not None:
                    await turns.wait(turn)  # claims run concurrently; the engine's FIFO gets the fair order
                try:
                    rid = await self.engine.submit(request)
                except BadRequest:
                    if not request.image_prefix:
                        raise
                    # the model serving now cannot take the parent's tokens (another codebook or image size):
                    # a seed-only variation rather than none
                    log.warning("generation %s: the engine refused its image prefix; sampling it without", gen.id)
                    request = dataclasses.replace(request, image_prefix=())
                    rid = await self.engine.submit(request)
            finally:
                if turn is not None:
                    turns.finish(turn)
            self._engine_ids[gen.id] = rid
            await self._progress(gen, ProgressUpdate(gen.id, "running"))
            heard = _Heard(asyncio.get_running_loop().time())
            events = asyncio.create_task(self._forward_events(gen, rid, heard))
            try:
                result = await self._result_unless_stalled(rid, events, heard)
            finally:
                events.cancel()
                try:
                    await events
                except asyncio.CancelledError:
                    pass
                except Exception:  # noqa: BLE001 - progress is best effort; the result decides the job
                    log.warning("progress stream of generation %s failed", gen.id, exc_info=True)
        except asyncio.CancelledError:
            # shutdown: give the job back to the queue for the next start (and cancel it on the engine, also
            # when the submit was under way: the engine may have taken it under the id we chose)
            rid = self._engine_ids.get(gen.id, request.request_id)
            if rid:
                with contextlib.suppress(Exception):
                    await self.engine.cancel(rid)
            await asyncio.shield(self.repo.release(gen.id, self.leases.owner))
            raise
        except (EngineError, RequestCancelled) as exc:
            await asyncio.shield(self._finish_failed(gen, str(exc) or exc.__class__.__name__))
            return
        except Exception:  # noqa: BLE001 - a bug or a broken engine: the user hears of it, the job is not stranded
            log.exception("generation %s: the engine call failed unexpectedly", gen.id)
            await asyncio.shield(self._finish_failed(gen, "internal error in the image engine; please try again"))
            return
        finally:
            self._engine_ids.pop(gen.id, None)
        try:
            outcome = await asyncio.shield(self._while_unreachable(f"storing generation {gen.id}",
                                                                   lambda: self._finish_ok(gen, result)))
        except TakenOver:  # our lease ran out and another process runs the job now: its result counts
            log.warning("generation %s was taken over by another process; this result is dropped", gen.id)
            return
        except Exception:  # noqa: BLE001 - disk full, database gone...: fail the job instead of leaving it running
            log.exception("generation %s: storing the result failed", gen.id)
            await asyncio.shield(self._while_unreachable(
                f"failing generation {gen.id}",
                lambda: self._finish_failed(gen, "the images could not be stored; please try again")))
            return
        self.leases.publish_later(outcome)

    async def _image_prefix(self, gen: Any) -> tuple[int, ...]:
        """A variation's kept rows of its parent image (:mod:`bot.variations`); none if they cannot be read, which
        leaves a seed-only variation rather than a failed job."""
        try:
            return await variation_prefix(self.repo, gen)
        except Exception:  # noqa: BLE001 - see above
            log.warning("generation %s: reading its parent image's tokens failed", gen.id, exc_info=True)
            return ()

    async def _claim(self, generation_id: int, attempts: int = 4) -> Any:
        """``repo.claim`` with a few retries, and more while the database is unreachable: a transient database
        error must not drop a queued job (the worker forgets it either way; the row would wait for the next start)."""
        for attempt in range(attempts):
            try:
                return await self._while_unreachable(
                    f"claiming generation {generation_id}",
                    lambda: self.repo.claim(generation_id, self.leases.owner, self.leases.until()))
            except Exception:  # noqa: BLE001 - retried, then raised
                if attempt == attempts - 1:
                    raise
                log.warning("claiming generation %s failed; retrying", generation_id, exc_info=True)
                await asyncio.sleep(self.retry_delay * 2**attempt)
        return None


    async def _while_unreachable(self, what: str, step: Callable[[], Awaitable[Any]]) -> Any:
        return await while_unreachable(what, step, limit_s=self.unreachable_retry_s, first_delay=self.retry_delay)

    async def _result_unless_stalled(self, rid: str, events: asyncio.Task, heard: _Heard) -> GenerationResult:
        """``engine.result(rid)``, given up (cancelled on the engine, EngineError) once the job's event stream has
        been silent for ``engine_stall_timeout``. A stream that ended or broke cannot be watched: then this waits
        for the result as it is."""
        loop = asyncio.get_running_loop()
        result = asyncio.ensure_future(self.engine.result(rid))
        try:
            while True:
                if not self.engine_stall_timeout or events.done():
                    return await result
                left = heard.at + self.engine_stall_timeout - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait({result}, timeout=left)
                if done:
                    return result.result()
        finally:
            if not result.done():
                result.cancel()
        log.error("engine request %s: no progress for %.0f s; cancelling it", rid, self.engine_stall_timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.engine.cancel(rid), 10.0)
        raise EngineError("the image engine stopped responding (no progress for "
                          f"{human_duration(self.engine_stall_timeout)}); please try again")

    async def _forward_events(self, gen: Any, rid: str, heard: _Heard) -> None:
        last = -1e9
        loop = asyncio.get_running_loop()
        async for ev in self.engine.events(rid):
            heard.at = loop.time()
            if ev.state != "running":
                continue
            now = self.clock()
            if now - last < self.progress_interval and ev.tokens_done < ev.tokens_total:
                continue
            last = now
            await self._progress(gen, ProgressUpdate(gen.id, "running", tokens_done=ev.tokens_done,
                                                     tokens_total=ev.tokens_total))

    # -- storing the result --------------------------------------------------------------------------

    async def _finish_failed(self, gen: Any, error: str) -> None:
        log.warning("generation %s failed: %s", gen.id, error)
        try:
            gen = await self.repo.set_status(gen.id, Status.FAILED.value, error=error[:500], owner=self.leases.owner)
        except TakenOver:
            log.warning("generation %s was taken over by another process; not marked failed here", gen.id)
            return
        self.leases.publish_later(Outcome(gen, [], error=error))

    async def _finish_ok(self, gen: Any, result: GenerationResult) -> Outcome:
        """Write PNGs, store Image rows, open cases for flagged images and for near-duplicates of blocked hashes
        (withheld), mark done (one uncancellable step)."""
        withhold = await self.flagged_mode(gen.guild_id) == FlaggedMode.WITHHOLD.value
        owner = self.leases.owner
        written = await asyncio.to_thread(_write_pngs, self.output_dir / str(gen.id), gen.id, result)
        files = [(path, sha) for path, sha, _ in written]
        phashes = [phash for _, _, phash in written]
        blocked = (await self.blocklist.matches(gen.guild_id, phashes) if self.blocklist is not None
                   else [None] * len(phashes))
        new = [NewImage.from_generated(im, file_path=str(path), sha256=sha, phash=phash,
                                       hidden=bool(im.flagged) or hit is not None)
               for im, (path, sha), phash, hit in zip(result.images, files, phashes, blocked, strict=True)]
        cases: dict[int, tuple[str, str | None]] = {}  # image index → its review case, opened with the images
        for im, hit in zip(new, blocked, strict=True):
            if hit is not None:
                cases[im.index] = (CaseSource.BLOCKLIST.value, hit.reason)
            elif im.flagged:
                severity = " (critical)" if im.critical else ""
                scores = ", ".join(f"{k}={v:.2f}" for k, v in sorted((im.safety_scores or {}).items()))
                cases[im.index] = (CaseSource.AUTO.value, f"safety checker{severity}: {scores}")
        # one transaction: a retry after the database dropped the connection finds nothing half written
        gen, rows = await self.repo.finish_generation(gen.id, new, checkpoint_id=result.checkpoint_id,
                                                      attention=result.attention, owner=owner, cases=cases)
        images = [
            StoredImage(id=row.id, index=row.index, rank=row.rank, path=Path(path), sha256=sha,
                        clip_score=row.clip_score, flagged=row.flagged, hidden=row.hidden,
                        withheld=is_withheld(row.flagged, row.hidden, withhold, row.critical), png=im.png)
            for row, im, (path, sha) in zip(rows, result.images, files, strict=True)
        ]
        images.sort(key=lambda s: s.rank)
        return Outcome(gen, images)


def _write_pngs(folder: Path, gen_id: int, result: GenerationResult) -> list[tuple[Path, str, str | None]]:
    """Each image's file, SHA-256 and perceptual hash (run in a worker thread: hashing is CPU work)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for im in result.images:
        path = folder / f"{gen_id}-r{im.rank}-i{im.index}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(im.png)
        tmp.replace(path)
        out.append((path.resolve(), hashlib.sha256(im.png).hexdigest(), phash_png(im.png)))
    return out


@dataclass
class _Heard:
    """When (event-loop time) a job's engine event stream last said anything."""

    at: float


class _Turns:
    """Tickets in the order workers took jobs from the fair queue: ``wait(t)`` returns once every earlier ticket
    is ``finish``ed, so jobs whose database claims overlap still reach the engine in the scheduler's order."""

    def __init__(self) -> None:
        self._issued = 0
        self._turn = 0  # every ticket below this is finished
        self._finished: set[int] = set()
        self._waiters: dict[int, asyncio.Future] = {}

    def take(self) -> int:
        self._issued += 1
        return self._issued - 1

    async def wait(self, ticket: int) -> None:
        if ticket <= self._turn:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = fut
        try:
            await fut
        finally:
            self._waiters.pop(ticket, None)

    def finish(self, ticket: int) -> None:
        """Idempotent; must be called for every ticket taken (also when its job fails or is cancelled)."""
        if ticket < self._turn:
            return
        self._finished.add(ticket)
        while self._turn in self._finished:
            self._finished.discard(self._turn)
            self._turn += 1
        fut = self._waiters.get(self._turn)
        if fut is not None and not fut.done():
            fut.set_result(None)
