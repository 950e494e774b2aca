"""The terminal's ``/admin``: the operator changes any guild's settings and filter terms through the same
``bot.admin.AdminService`` as ``/dalle-admin`` (checked, audited under the terminal user's id, in effect at once).

    /admin <guild-id> settings                     show them (and what AutoMod does there)
    /admin <guild-id> set key=value [key=value…]   e.g. max_images=4 private_results=no add_channel=3001
    /admin <guild-id> reset <key>                  back to the bot's default
    /admin <guild-id> filter add|allow|remove <term…> | filter list
    /admin model                                   the checkpoint, attention backend and dtype serving
"""

from __future__ import annotations

from typing import Any

from bot.admin import SETTINGS, Admin

USAGE = ("usage: /admin <guild-id> settings | set key=value… | reset <key> | filter add|allow|remove <term> | "
         "filter list; /admin model")
_INTS = {"review_channel_id", "moderator_role_id", "daily_quota", "max_queue_per_user", "max_images", "add_channel",
         "remove_channel"}
_BOOLS = {"private_results", "automod", "any_channel"}
_TRUE, _FALSE = {"yes", "true", "on", "1"}, {"no", "false", "off", "0"}


def _value(key: str, text: str) -> Any:
    if key in _INTS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} must be a whole number") from None
    if key in _BOOLS:
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError(f"{key} must be yes or no")
        return text.lower() in _TRUE
    return text


async def admin_command(admin: Any, operator_id: int, args: list[str]) -> str:
    """Run ``/admin``'s arguments against ``admin`` (a ``bot.admin.AdminService``); returns what to print. Bad
    input raises ValueError (nothing changed)."""
    if args[:1] == ["model"]:
        info = await admin.model(Admin(operator_id, 0, True))
        return f"model: checkpoint {info.checkpoint_id} · attention {info.attention} · dtype {info.dtype}"
    if len(args) < 2 or not args[0].isdigit():
        raise ValueError(USAGE)
    actor = Admin(user_id=operator_id, guild_id=int(args[0]), can_manage_guild=True)
    what, rest = args[1], args[2:]
    if what == "settings":
        values = await admin.show(actor)
        lines = [f"{SETTINGS[k]}: {v}{'' if own else ' (default)'}" for k, (v, own) in values.items()]
        return "\n".join([*lines, f"AutoMod: {await admin.automod_status(actor)}"])
    if what == "set":
        fields = {}
        for pair in rest:
            key, sep, text = pair.partition("=")
            if not sep or key not in set(SETTINGS) | _INTS | _BOOLS:
                raise ValueError(f"not a setting: {pair!r} (keys: {', '.join(SETTINGS)}, add_channel, "
                                 f"remove_channel, any_channel)")
            fields[key] = _value(key, text.replace("_", " ") if key.startswith("rate_limit") else text)
        return await admin.set(actor, **fields)
    if what == "reset" and len(rest) == 1:
        return await admin.reset(actor, rest[0])
    if what == "filter" and rest[:1] == ["list"]:
        block, allow = await admin.filter_list(actor)
        return f"blocked: {', '.join(block) or 'none'}\nallowed: {', '.join(allow) or 'none'}"
    if what == "filter" and len(rest) >= 2 and rest[0] in ("add", "allow", "remove"):
        act = {"add": admin.filter_add, "allow": admin.filter_allow, "remove": admin.filter_remove}[rest[0]]
        return await act(actor, " ".join(rest[1:]))
    raise ValueError(USAGE)
