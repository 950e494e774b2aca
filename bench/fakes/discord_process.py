"""The strict loopback fake Discord (``bench.fakes.discord``) in its own process, driven over stdin/stdout.

``bench/bot.py`` starts ``python -m bench.fakes.discord_process``, so the fake's event loop (gateway dispatch,
REST handling, timestamps) does not share a loop or a GIL with the bot under test. Every timestamp is the
fake's own ``time.monotonic()``: a latency is measured from the moment the fake dispatched an interaction
to the moment the bot's callback (or result post) reached it.

Protocol: one JSON object per line. On start the process prints ``{"api_base", "gateway_url"}``; then each
command line gets exactly one reply line.

- ``{"cmd": "burst", "users": N, "images": K, "rate": R, "user_base": U}``: dispatch N ``/dalle`` commands from
  users U..U+N-1, all at once (R = 0) or R per second. Reply ``{"dispatched": N}``.
- ``{"cmd": "collect", "wait_s": S}``: wait (at most S seconds) until every interaction of the burst has an
  interaction callback and a result message, then reply with one record per user plus the fake's error and
  unknown-route counts.
- ``{"cmd": "reset"}``: forget recorded calls, messages and interactions (the next round starts clean).
- ``{"cmd": "quit"}``: close the server and exit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.fakes.discord import FakeDiscord

PROMPT = "a watercolour painting of a lighthouse, user {u}"


class Driver:
    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.burst: list[tuple[int, Any]] = []  # (user_id, InteractionRecord)
        self.images = 0
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()

    async def run_burst(self, users: int, images: int, rate: float, user_base: int) -> dict:
        self.burst, self.images = [], images
        gap = 1.0 / rate if rate > 0 else 0.0
        start = time.monotonic()
        for k in range(users):
            if gap:
                delay = start + k * gap - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            uid = user_base + k
            rec = await self.fake.slash("dalle", {"prompt": PROMPT.format(u=uid), "images": images}, user_id=uid)
            self.burst.append((uid, rec))
        return {"dispatched": len(self.burst)}

    def _scan(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """First callback per interaction id, first result post per user id."""
        callbacks: dict[int, Any] = {}
        posts: dict[int, Any] = {}
        mentions = {f"<@{uid}>": uid for uid, _ in self.burst}
        for c in self.fake.calls:
            if c.method != "POST":
                continue
            parts = c.path.strip("/").split("/")
            if parts[0] == "interactions" and parts[-1] == "callback":
                callbacks.setdefault(int(parts[1]), c)
            elif parts[0] == "channels" and parts[-1] == "messages":
                content = (c.json or {}).get("content") or ""
                head = content.split(" ", 1)[0]
                if head in mentions:
                    posts.setdefault(mentions[head], c)
        return callbacks, posts

    async def collect(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            callbacks, posts = self._scan()
            done = all(rec.id in callbacks and uid in posts for uid, rec in self.burst)
            if done or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        t0 = min((rec.dispatched_at for _, rec in self.burst), default=0.0)
        users = []
        for uid, rec in self.burst:
            cb, post = callbacks.get(rec.id), posts.get(uid)
            users.append({
                "user": uid,
                "dispatched_s": rec.dispatched_at - t0,
                "ack_s": None if cb is None else cb.at - rec.dispatched_at,
                "ack_status": None if cb is None else cb.status,
                "ack_type": None if cb is None else (cb.json or {}).get("type"),
                "result_s": None if post is None else post.at - rec.dispatched_at,
                "result_at_s": None if post is None else post.at - t0,
                "result_status": None if post is None else post.status,
                "images": 0 if post is None else sum(1 for name in post.files if name != "grid.png"),
            })
        # this process's CPU seconds per wall second since the reset: on a small machine the fake competes with
        # the bot and the engine for the same cores (a real Discord does not)
        cpu_share = (time.process_time() - self.cpu0) / max(time.monotonic() - self.wall0, 1e-9)
        return {"complete": done, "users": users, "expected_images": self.images, "calls": len(self.fake.calls),
                "cpu_share": cpu_share,
                "errors": [[c.method, c.path, c.status] for c in self.fake.errors][:20],
                "error_count": len(self.fake.errors),
                "unknown": [[c.method, c.path] for c in self.fake.unknown][:20]}

    def reset(self) -> dict:
        f = self.fake
        for store in (f.calls, f.unknown, f.errors):
            store.clear()
        for table in (f.messages, f.files, f.interactions):
            table.clear()
        self.burst = []
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()
        return {"reset": True}


async def main() -> int:
    fake = await FakeDiscord().start()
    driver = Driver(fake)
    print(json.dumps({"api_base": fake.api_base, "gateway_url": fake.gateway_url}), flush=True)
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:  # the bench went away
                return 0
            try:
                msg = json.loads(line)
                cmd = msg.get("cmd")
                if cmd == "burst":
                    reply = await driver.run_burst(int(msg["users"]), int(msg["images"]), float(msg.get("rate", 0)),
                                                   int(msg.get("user_base", 1)))
                elif cmd == "collect":
                    reply = await driver.collect(float(msg.get("wait_s", 60)))
                elif cmd == "reset":
                    reply = driver.reset()
                elif cmd == "quit":
                    print(json.dumps({"bye": True}), flush=True)
                    return 0
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
            except Exception as exc:  # noqa: BLE001 - the bench gets the reason instead of a hang
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        await fake.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
