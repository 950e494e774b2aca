"""Terminal front end: ``python -m bot`` without DISCORD_TOKEN.

It reads commands from stdin (see ``HELP``) and drives the same ``GenerationService`` (filters, rate limits, fair
queue, database records) as the Discord bot; results are PNG files under OUTPUT_DIR whose paths and scores are
printed. A bare line without a leading slash is taken as a prompt.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from bot.blocklist import blocks_text
from bot.config import Settings
from bot.moderation import CaseNotFound, Moderator, NotModerator
from bot.outcome import MAX_IMAGES, Outcome, ProgressUpdate, from_discord
from bot.privacy import PrivacyService
from bot.service import GenerationService
from bot.terminal_admin import admin_command
from bot.wiring import engine_for_settings, open_repository, service_from_settings
from engine.api import Engine
from engine.client import EngineUnavailable

log = logging.getLogger(__name__)

TERMINAL_USER_ID = 1
HELP = f"""

    /dalle <prompt> [--n N] [--seed S]   queue a generation (N images, 1-{MAX_IMAGES})
    /reroll <generation-id>              same prompt, new seed
    /variation <image-id>                more like that image
    /feedback <image-id> up|down|report [reason] [note...]
    /cancel <generation-id>              cancel a queued generation
    /queue                               your unfinished generations and their positions
    /cases                               open moderation cases (you are the operator: every case)
    /case <id> [approve|remove|dismiss [reason...]]   show a case, or decide it
    /ban <user-id> <reason...>, /unban <user-id>      the operator's ban, in every guild
    /case <id> accept|reject [reason...]              decide an appeal (accept lifts bans, cooldowns, strikes)
    /user <user-id> [guild-id]           a user's record: generations, refusals, strikes, bans, cases, reports made
    /strikes reset <user-id> [guild-id]  clear a user's strikes (outside guilds, or in one) and their cooldowns
    /purge <user-id> <guild-id>          take every image the user made in that guild out of public messages
    /privacy optout|optin|export|delete [confirm]    your data: training use, a JSON export, deletion
    /block <case-id> [reason...]         block the case's image hash in every guild
    /unblock <case-id> [reason...]       lift the blocks matching the case's image (or a near-copy), anywhere
    /blocklist                           the image hashes blocked
    /admin <guild-id> settings | set key=value… | reset <key> | filter add|allow|remove <term> | filter list
                                         a guild's settings and filter terms; /admin model: the model serving
    /help, /quit                         (end of input also quits, after queued work finishes)"""


class TerminalPublisher:
    """Prints progress and results; one line per event so scripts can parse it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.finished: dict[int, asyncio.Event] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def progress(self, generation: Any, update: ProgressUpdate) -> None:
        self._print(f"[{generation.id}] {update.text}")

    async def publish(self, outcome: Outcome) -> int | None:
        gen = outcome.generation
        if not outcome.ok:
            self._print(f"[{gen.id}] failed: {outcome.error}")
        else:
            self._print(f"[{gen.id}] done: {len(outcome.images)} image(s) for {gen.prompt!r} (seed {gen.seed})")
            for im in outcome.images:
                note = ""
                if im.withheld:
                    note = ("  WITHHELD (flagged by the safety checker)" if im.flagged
                            else "  WITHHELD (near-duplicate of a blocked image)")
                elif im.flagged:
                    note = "  FLAGGED (hidden)"
                self._print(f"  image {im.id}  rank {im.rank}  clip {im.clip_score:.3f}  {im.path}{note}")
        self.finished.setdefault(gen.id, asyncio.Event()).set()
        return None


def _id(text: str) -> int | None:
    """A database id typed by the user (ASCII digits, fits a 63-bit integer), else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)


def parse_dalle(args: str) -> tuple[str, dict[str, int]]:
    """Split ``--n 4 --seed 7`` style options from the prompt text; raises ValueError with a usage hint."""
    words = args.split()
    prompt_words: list[str] = []
    opts: dict[str, int] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and w not in ("--n", "--images", "--seed"):
            raise ValueError(f"unknown option {w} (options: --n N, --seed S)")
        if w in ("--n", "--images", "--seed"):
            if i + 1 >= len(words):
                raise ValueError(f"{w} needs a number")
            try:
                opts["seed" if w == "--seed" else "n"] = int(words[i + 1])
            except ValueError:
                raise ValueError(f"{w} needs a whole number, got {words[i + 1]!r}") from None
            i += 2
            continue
        prompt_words.append(w)
        i += 1
    return " ".join(prompt_words), opts


class TerminalFrontEnd:
    def __init__(self, service: GenerationService, publisher: TerminalPublisher, out: TextIO,
                 user_id: int = TERMINAL_USER_ID) -> None:
        self.service = service
        self.publisher = publisher
        self.out = out
        self.user_id = user_id
        self.pending: set[int] = set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def handle(self, line: str) -> bool:
        """Run one command; False means quit. A failing command is reported and the session goes on."""
        try:
            return await self._handle(line)
        except Exception as exc:  # noqa: BLE001 - one bad command must not end the session (and its queue)
            log.exception("command %r failed", line.strip()[:80])
            self.say(f"error: that command failed ({type(exc).__name__}); the session goes on")
            return True

    async def _handle(self, line: str) -> bool:
        # undecodable input bytes (surrogate escapes) become U+FFFD instead of failing in the database
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
        if not line:
            return True
        if line.lower() in ("quit", "exit", "help", "queue"):  # bare words users type: commands, not prompts
            line = "/" + line.lower()
        if not line.startswith("/"):
            line = "/dalle " + line
        cmd, _, args = line.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/dalle":
            try:
                prompt, opts = parse_dalle(args)
            except ValueError as exc:
                self.say(f"error: {exc}")
                return True
            adm = await self.service.submit(user_id=self.user_id, prompt=prompt, n=opts.get("n"),
                                            seed=opts.get("seed"))
            self._admitted(adm)
        elif cmd in ("/reroll", "/variation", "/cancel"):
            target = _id(args.strip())
            if target is None:
                self.say(f"usage: {cmd} <id>")
                return True
            if cmd == "/cancel":
                ok = await self.service.cancel(target, self.user_id)
                self.pending.discard(target) if ok else None
                self.say(f"cancelled {target}" if ok else f"could not cancel {target} (not yours or not queued)")
            elif cmd == "/reroll":
                self._admitted(await self.service.reroll(target, self.user_id))
            else:
                self._admitted(await self.service.variation(target, self.user_id))
        elif cmd == "/feedback":
            parts = args.split()
            if len(parts) < 2 or _id(parts[0]) is None:
                self.say("usage: /feedback <image-id> up | down [bias|quality|other] "
                         "| report [nsfw|bias|quality|other] [note]")
                return True
            kind = parts[1].lower()
            reason = parts[2].lower() if kind in ("report", "down") and len(parts) > 2 else None
            note = " ".join(parts[3:]) or None if kind == "report" else None
            res = await self.service.feedback(int(parts[0]), self.user_id, kind, reason=reason, note=note)
            self.say(res.message if res.ok else f"error: {res.message}")
        elif cmd in ("/cases", "/case", "/ban", "/unban", "/block", "/unblock", "/blocklist", "/user", "/strikes",
                     "/purge"):
            try:
                await self._moderate(cmd, args.split())
            except (NotModerator, CaseNotFound, ValueError) as exc:
                self.say(f"error: {exc}")
        elif cmd == "/privacy":
            await self._privacy(args.split())
        elif cmd == "/admin":  # any guild's settings and filter terms (bot.terminal_admin)
            try:
                self.say(await admin_command(self.service.admin, self.user_id, args.split()))
            except ValueError as exc:
                self.say(f"error: {exc}")
        elif cmd == "/queue":
            jobs = await self.service.user_queue(self.user_id)
            if not jobs:
                self.say("Your queue is empty.")
            for gen, pos in jobs:
                where = "running" if pos == 0 else f"position {pos}" if pos else gen.status
                self.say(f"  [{gen.id}] {where}: {gen.prompt!r} ({gen.n_images} images)")
        else:
            self.say(f"unknown command {cmd}; try /help")
        return True

    async def _moderate(self, cmd: str, parts: list[str]) -> None:
        """The operator's side of moderation, through the same ModerationService as Discord's moderators."""
        moderation = self.service.moderation
        me = Moderator(user_id=self.user_id, guild_id=None, operator=True)
        if cmd == "/cases":
            cases = await moderation.cases(me)
            self.say("No open cases." if not cases else "\n".join(
                f"  case {c.id}: {c.source}, image {c.image_id}, {c.reason or ''}" for c in cases))
            return
        if cmd == "/blocklist":
            self.say(blocks_text(await self.service.blocklist.blocks(me)))
            return
        if cmd in ("/user", "/strikes", "/purge"):
            await self._member(cmd, parts)
            return
        target = _id(parts[0]) if parts else None
        if target is None:
            self.say(f"usage: {cmd} <id> ...")
            return
        rest = " ".join(parts[1:])
        if cmd in ("/block", "/unblock"):
            blocklist = self.service.blocklist
            act = blocklist.block_everywhere if cmd == "/block" else blocklist.unblock
            self.say(await act(me, target, rest or None))
        elif cmd == "/ban":
            self.say(await moderation.operator_ban(me, target, rest))
        elif cmd == "/unban":
            self.say(await moderation.operator_ban(me, target, rest, lift=True))
        elif not parts[1:]:
            case = await moderation.case(me, target)
            self.say(f"case {case.case_id} ({case.status}, {case.source}): {case.prompt!r} by user {case.author_id}, "
                     f"seed {case.seed}, image {case.image_id}, scores {case.safety_scores}, "
                     f"{len(case.reports)} report(s)" + "".join(f"\n  {a.action} by {a.moderator_id}: {a.reason or ''}"
                                                             for a in case.actions))
        elif parts[1].lower() in ("approve", "remove", "dismiss"):
            result = await getattr(moderation, parts[1].lower())(target, me, " ".join(parts[2:]) or None)
            self.say(result.message)
        elif parts[1].lower() in ("accept", "reject"):  # an appeal
            result = await getattr(self.service.appeals, parts[1].lower())(target, me, " ".join(parts[2:]) or None)
            self.say(result.message)
        else:
            self.say("usage: /case <id> [approve|remove|dismiss|accept|reject [reason...]]")

    async def _privacy(self, parts: list[str]) -> None:
        """The terminal user's own data, through the same PrivacyService as ``/dalle-privacy``."""
        privacy = PrivacyService(self.service.repo, output_dir=self.service.runner.output_dir)
        what = parts[0].lower() if parts else ""
        if what == "optout":
            self.say(await privacy.opt_out(self.user_id))
        elif what == "optin":
            self.say(await privacy.opt_in(self.user_id))
        elif what == "export":
            path, summary = await privacy.export_to_file(self.user_id)
            self.say(f"{summary}\n  written to {path}")
        elif what == "delete" and parts[1:] == ["confirm"]:
            self.say(await privacy.delete(self.user_id))
        elif what == "delete" and len(parts) == 1:
            text, anything = await privacy.delete_preview(self.user_id)
            self.say(text.replace("Confirm to delete", "Type /privacy delete confirm to delete") if anything else text)
        else:
            self.say("usage: /privacy optout|optin|export|delete [confirm]")

    async def _member(self, cmd: str, parts: list[str]) -> None:
        """/user, /strikes reset, /purge: the operator acts on one guild's record (or outside guilds)."""
        if cmd == "/strikes":
            if not parts or parts[0].lower() != "reset":
                self.say("usage: /strikes reset <user-id> [guild-id]")
                return
            parts = parts[1:]
        ids = [_id(p) for p in parts]
        if not 1 <= len(ids) <= 2 or None in ids or (cmd == "/purge" and len(ids) != 2):
            self.say({"/user": "usage: /user <user-id> [guild-id]", "/strikes": "usage: /strikes reset <user-id> "
                      "[guild-id]", "/purge": "usage: /purge <user-id> <guild-id>"}[cmd])
            return
        me = Moderator(user_id=self.user_id, guild_id=ids[1] if len(ids) == 2 else None, operator=True)
        strikes = self.service.strikes
        if cmd == "/strikes":
            self.say(await strikes.reset(me, ids[0]))
        elif cmd == "/purge":
            self.say(await strikes.purge(me, ids[0]))
        else:
            r = await strikes.record(me, ids[0])
            self.say(f"user {ids[0]}: {r.generations} generation(s), {r.refusals} refusal(s), {r.live_strikes} live "
                     f"strike(s) ({r.strikes} ever), {r.reports_made} report(s) made"
                     + (", banned by the operator" if r.globally_banned else "")
                     + "".join(f"\n  {b.kind} in {b.guild_id} by {b.moderator_id}: {b.reason or ''}"
                               + (" (lifted)" if b.lifted_at else "") for b in r.bans)
                     + "".join(f"\n  case {c.id}: {c.source}, {c.status}" for c in r.cases))

    def _admitted(self, adm) -> None:
        if adm.ok:
            self.pending.add(adm.generation_id)
            self.publisher.finished.setdefault(adm.generation_id, asyncio.Event())
            self.say(f"[{adm.generation_id}] queued at position {adm.position} (seed {adm.seed})")
        else:
            self.say(f"refused: {adm.message}")

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for this session's generations to be published."""
        events = [self.publisher.finished[g] for g in self.pending if g in self.publisher.finished]
        if events:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)


def _stdin_lines(stdin: TextIO) -> asyncio.Queue[str]:
    """Lines of ``stdin`` ("" at EOF) read by a daemon thread: a blocked read never holds up exit (Ctrl-C quits
    at once; an executor thread would be joined at shutdown, waiting for Enter)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                line = stdin.readline()
            except (OSError, ValueError):  # closed stream
                line = ""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            except RuntimeError:  # the loop is closed: we are exiting
                return
            if line == "":
                return

    threading.Thread(target=read, name="stdin-reader", daemon=True).start()
    return queue


async def run(settings: Settings, stdin: TextIO | None = None, out: TextIO | None = None,
              engine: Engine | None = None, on_shutdown: Callable[[], Any] | None = None) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    if engine is None:
        # no warm-up here: one request at a time, and Ctrl-C must not wait for a throw-away compile
        engine = await asyncio.to_thread(functools.partial(engine_for_settings, settings, warmup=False))
    repo = await open_repository(settings)
    publisher = TerminalPublisher(out)
    # a Discord user's job is the bot's to deliver
    service = service_from_settings(settings, repo, engine, publisher, owns=lambda gen: not from_discord(gen))
    front = TerminalFrontEnd(service, publisher, out)
    await service.start()
    print("dalle-bot local mode: type /help for commands.", file=out, flush=True)
    lines = _stdin_lines(stdin)
    try:
        while True:
            line = await lines.get()
            if line == "":  # EOF
                break
            if not await front.handle(line):
                break
        await front.drain()
    finally:
        if on_shutdown is not None:
            on_shutdown()
        await service.stop()
        await engine.close()
        await repo.close()
    return 0


SHUTDOWN_DEADLINE_S = 15.0  # stop() gives running jobs 10 s; past this the process exits regardless


def _exit_deadline(seconds: float) -> None:
    """A daemon timer that ends the process if shutting down (or the interpreter's exit) takes longer than
    ``seconds``: Ctrl-C must quit even if a thread hangs. Before exiting it writes every thread's stack to stderr,
    so the hang can be found. Nothing is lost: stop() has already put unfinished jobs back in the queue, and every
    database write is one transaction."""

    def expire() -> None:
        print(f"error: shutdown took more than {seconds:g} s; exiting (thread stacks follow)", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(130)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main(settings: Settings) -> int:
    """Entry point used by ``python -m bot`` when no DISCORD_TOKEN is set. Returns the exit status."""
    try:
        return asyncio.run(run(settings, on_shutdown=lambda: _exit_deadline(SHUTDOWN_DEADLINE_S)))
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
