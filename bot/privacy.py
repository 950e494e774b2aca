"""A user's say over their own data, Discord-independent: opt out of (or back into) training use, export
everything stored about them as JSON, and delete it.

Opting out sets ``user_state.opted_out``; the feedback dataset (``training.feedback``) then leaves out their
generations and their votes. Deletion keeps what an open moderation case needs, and what is still queued or
running, and says so (see ``store.repo.privacy``); the deleted images' files go too. Deletions are audited and
logged with counts only, never a prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from store.repository import Deletion, Repository, UserData

log = logging.getLogger(__name__)

OPTED_OUT = ("You are opted out: your generations and your votes and reports will not be used to train the "
             "model. `/dalle-privacy optin` undoes this.")
OPTED_IN = ("You are opted in again: your generations and feedback may be used to train the model. "
            "`/dalle-privacy optout` stops that at any time.")


@dataclass(frozen=True)
class DataExport:
    filename: str
    data: bytes  # UTF-8 JSON
    summary: str


def _at(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _snowflake(value: int | None) -> str | None:
    """Discord ids as strings: JSON readers that use doubles would round them."""
    return str(value) if value is not None else None


def _tokens(image: Any) -> list[int] | None:
    tokens = image.tokens
    return None if tokens is None else tokens.tolist()


def _encoded(data: UserData, now: datetime) -> bytes:
    return json.dumps(export_document(data, now), indent=2, ensure_ascii=False).encode("utf-8")


def export_document(data: UserData, now: datetime) -> dict[str, Any]:
    """What an export holds: the user's own rows, without secrets (interaction tokens) or moderators' ids."""
    state = data.state
    return {
        "user_id": _snowflake(data.user_id),
        "exported_at": _at(now),
        "training_opt_out": bool(state and state.opted_out),
        "global_ban": {"banned": bool(state and state.banned), "reason": state.ban_reason if state else None},
        "generations": [{
            "id": g.id, "queued_at": _at(g.queued_at), "finished_at": _at(g.finished_at),
            "guild_id": _snowflake(g.guild_id), "channel_id": _snowflake(g.channel_id), "prompt": g.prompt,
            "normalized_prompt": g.normalized_prompt, "kind": g.kind, "seed": g.seed, "n_images": g.n_images,
            "params": g.params, "status": g.status, "private": g.private, "model_id": g.checkpoint_id,
            "parent_generation_id": g.parent_generation_id, "parent_image_id": g.parent_image_id,
            "images": [{"id": im.id, "index": im.index, "rank": im.rank, "clip_score": im.clip_score,
                        "flagged": im.flagged, "hidden": im.hidden, "sha256": im.sha256,
                        "file": Path(im.file_path).name if im.file_path else None,
                        "tokens": _tokens(im)} for im in g.images],
        } for g in data.generations],
        "votes": [{"image_id": f.image_id, "vote": f.kind, "at": _at(f.created_at),
                   **({"reason": f.reason} if f.reason else {})}  # a 👎's "what was wrong", when given
                  for f in data.feedback if f.kind != "report"],
        "reports": [{"image_id": f.image_id, "reason": f.reason, "note": f.note, "at": _at(f.created_at)}
                    for f in data.feedback if f.kind == "report"],
        "refused_prompts": [{"at": _at(r.created_at), "guild_id": _snowflake(r.guild_id), "prompt": r.prompt,
                             "reason": r.reason} for r in data.refusals],
        "strikes": [{"at": _at(s.created_at), "guild_id": _snowflake(s.guild_id), "source": s.source,
                     "reason": s.reason, "expires_at": _at(s.expires_at), "cleared_at": _at(s.cleared_at)}
                    for s in data.strikes],
        "bans": [{"guild_id": _snowflake(b.guild_id), "kind": b.kind, "reason": b.reason, "from": _at(b.created_at),
                  "until": _at(b.expires_at), "lifted_at": _at(b.lifted_at)} for b in data.bans],
        "moderation_cases": [{"id": c.id, "source": c.source, "status": c.status, "image_id": c.image_id,
                              "generation_id": c.generation_id, "opened_at": _at(c.opened_at),
                              "closed_at": _at(c.closed_at)} for c in data.cases],
    }


def _deletion_text(d: Deletion, *, done: bool) -> str:
    verb = "Deleted" if done else "This deletes"
    lines = [f"{verb} {d.generations} generation(s) with {d.images} image(s) and their files, {d.feedback} "
             f"vote(s)/report(s) and {d.refusals} refused prompt(s)."]
    kept = []
    if d.kept_for_cases:
        kept.append(f"{d.kept_for_cases} generation(s) an open moderation case needs")
    if d.kept_reports:
        kept.append(f"{d.kept_reports} report(s) an open moderation case answers")
    if d.kept_refusals:
        kept.append(f"{d.kept_refusals} refused prompt(s) an open moderation case is about")
    if d.in_progress:
        kept.append(f"{d.in_progress} generation(s) still queued or running")
    if kept:
        lines.append("Kept: " + "; ".join(kept) + " (run this again once "
                     + ("they are decided" if d.in_progress == 0 else "they are finished or decided") + ").")
    lines.append("Messages already posted in channels stay on Discord; strikes, bans and moderators' records are "
                 "kept.")
    return "\n".join(lines)


def _remove_files(paths: list[str]) -> int:
    """Remove the deleted images' PNG files (only PNGs: a row names nothing else); returns how many were there."""
    removed = 0
    for name in paths:
        path = Path(name)
        if path.suffix.lower() != ".png":
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove an image file of a deleted generation", exc_info=True)
        if path.parent.name.isdigit():  # the runner's folder of one generation: gone once empty
            try:
                path.parent.rmdir()
            except OSError:
                pass
    return removed


class PrivacyService:
    def __init__(self, repo: Repository, *, output_dir: str | Path = "outputs") -> None:
        """``output_dir``: where a front end without attachments (the terminal) writes exports."""
        self.repo = repo
        self.output_dir = Path(output_dir)

    async def opt_out(self, user_id: int) -> str:
        await self.repo.update_user_state(user_id, opted_out=True)
        log.info("user %s opted out of training use", user_id)
        return OPTED_OUT

    async def opt_in(self, user_id: int) -> str:
        await self.repo.update_user_state(user_id, opted_out=False)
        log.info("user %s opted back in to training use", user_id)
        return OPTED_IN

    async def export(self, user_id: int) -> DataExport:
        data = await self.repo.user_data(user_id)
        now = datetime.now(UTC)
        body = await asyncio.to_thread(_encoded, data, now)  # megabytes for a heavy user: off the event loop
        summary = (f"Your data: {len(data.generations)} generation(s), {len(data.feedback)} vote(s)/report(s), "
                   f"{len(data.refusals)} refused prompt(s), {len(data.strikes)} strike(s), {len(data.bans)} ban(s).")
        return DataExport(f"dalle-data-{user_id}-{now:%Y%m%d-%H%M%S}.json", body, summary)

    async def export_to_file(self, user_id: int) -> tuple[Path, str]:
        """The export written under ``output_dir`` (for the terminal); returns its path and the summary."""
        export = await self.export(user_id)
        path = self.output_dir / export.filename

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(export.data)

        await asyncio.to_thread(write)
        return path, export.summary

    async def delete_preview(self, user_id: int) -> tuple[str, bool]:
        """What a deletion would do, for the confirmation; and whether there is anything to delete."""
        d = await self.repo.delete_user_data(user_id, dry_run=True)
        if d.nothing:
            text = "Nothing of yours is stored that can be deleted."
            extra = _deletion_text(d, done=False).split("\n")[1:-1]
            return "\n".join([text, *extra]), False
        return _deletion_text(d, done=False) + "\nConfirm to delete; this cannot be undone.", True

    async def delete(self, user_id: int) -> str:
        d = await self.repo.delete_user_data(user_id)
        files = await asyncio.to_thread(_remove_files, d.files)
        log.info("privacy delete for user %s: %d generation(s), %d image(s) (%d file(s)), %d vote(s)/report(s), "
                 "%d refusal(s); kept %d for open cases, %d in progress", user_id, d.generations, d.images, files,
                 d.feedback, d.refusals, d.kept_for_cases + d.kept_reports + d.kept_refusals, d.in_progress)
        if d.nothing:
            return "\n".join(["Nothing of yours was left to delete.", *_deletion_text(d, done=False).split("\n")[1:]])
        return _deletion_text(d, done=True)
