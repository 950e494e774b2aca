"""Helpers of the web page's tests: a service with cases in two guilds, the page on a test server, sign-in."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

from bot.service import GenerationService
from bot.web.config import WebConfig
from bot.web.serve import build_app
from bot.webaccess import Grant, Rights, SignInLinks
from store.repository import NewImage
from tests.fakes.engine import FakeEngine

GUILD_A, GUILD_B = 2000, 2001
MOD_ROLE = 2500
MOD_A = Rights(user_id=9, grants={GUILD_A: Grant(roles=(MOD_ROLE,))})
ADMIN_A = Rights(user_id=8, grants={GUILD_A: Grant(manage_messages=True, admin=True)})
OPERATOR = Rights(user_id=1, operator=True)
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class FrontEnd:
    """Records what the moderation service asks a front end to do (the Discord one is tested elsewhere)."""

    def __init__(self) -> None:
        self.posts: list = []
        self.updates: list = []
        self.refreshed: list = []
        self.told: list = []

    async def post_case(self, channel_id: int, case: Any) -> int:
        self.posts.append((channel_id, case))
        return 900 + len(self.posts)

    async def update_case(self, channel_id: int, message_id: int, case: Any) -> None:
        self.updates.append((channel_id, message_id, case))

    async def refresh_result(self, outcome: Any) -> None:
        self.refreshed.append(outcome)

    async def tell_user(self, user_id: int, text: str, contact: Any) -> None:
        self.told.append((user_id, text, contact))


def png(seed: int) -> bytes:
    """A 64×64 pattern of its own (a plain colour is never blocked: its hash would match every plain image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).resize((64, 64), PILImage.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Made:
    case_id: int
    image_ids: list[int]
    generation_id: int


async def flagged_result(repo: Any, svc: Any, tmp_path: Any, guild_id: int, prompt: str, user_id: int = 77,
                         color: int = 0) -> Made:
    """A delivered public result of 3 images in ``guild_id`` whose third image was flagged: an open auto case."""
    gen = await repo.create_generation(user_id=user_id, prompt=prompt, guild_id=guild_id, channel_id=3000, seed=5,
                                       checkpoint_id="demo-1")
    images = []
    for i in range(3):
        path = tmp_path / f"g{gen.id}_{i}.png"
        path.write_bytes(png(1000 * color + 10 * guild_id + i))
        images.append(NewImage(index=i, tokens=[1, 2], rank=i, clip_score=0.3,
                               safety_scores={"nsfw": 0.91 if i == 2 else 0.01}, flagged=i == 2, hidden=i == 2,
                               file_path=str(path), sha256="ab" * 32))
    rows = await repo.add_images(gen.id, images)
    await repo.mark_delivered(gen.id, result_message_id=4444 + gen.id)
    case_id, _ = await svc.moderation.open_case("auto", image_id=rows[2].id, reason="flagged by the safety check")
    return Made(case_id, [r.id for r in rows], gen.id)


def make_service(repo: Any, tmp_path: Any) -> tuple[GenerationService, FrontEnd]:
    svc = GenerationService(repo, FakeEngine(), None, output_dir=tmp_path / "out", review_channel_id=3100)
    front = FrontEnd()
    svc.moderation.front_end = front
    return svc, front


def make_app(svc: Any, **config: Any) -> Any:
    return build_app(svc, WebConfig(secret_key="k" * 40, **config))


async def sign_in(client: Any, repo: Any, rights: Rights) -> str:
    """Sign ``client`` in through a fresh one-time link; returns the session's CSRF token."""
    token = await SignInLinks(repo).create(rights)
    page = await client.get(f"/signin/{token}")
    csrf = CSRF.search(await page.text())[1]
    done = await client.post("/signin", data={"token": token, "csrf": csrf}, allow_redirects=False)
    assert done.status == 303, await done.text()
    return CSRF.search(await (await client.get("/")).text())[1]
