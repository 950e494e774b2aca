"""The review channel's post of a moderation case: its embed, its buttons (Approve, Remove, Ban author, Dismiss,
History; a member's refusal pattern: Ban author, Dismiss, History; an appeal: Accept, Reject, History) and the ban
form.

Every button's custom id carries the case id (``dalle:case:<action>:<case>``), so posts made before a restart keep
working. Every click is checked again on the server side by ``ModerationService`` from the clicker's roles and
Manage Messages as Discord sent them with the interaction; a refused click changes nothing and is answered
privately. The ban form's submission is handled from its payload alone (``handle_ban_submit``), like the report
form, so a form opened before a restart still counts.
"""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.moderation import CaseNotFound, CaseView, Moderator, NotModerator, format_until
from bot.views.common import answers_failures, service_of
from bot.views.report import modal_values

ACTIONS = ("approve", "remove", "ban", "dismiss", "history")
# the buttons of a case by its source: a case about a member (no image) has no image to approve or remove
SOURCE_ACTIONS = {"refusals": ("ban", "dismiss", "history"), "appeal": ("accept", "reject", "history")}
_LABELS = {"approve": ("Approve", discord.ButtonStyle.success), "remove": ("Remove", discord.ButtonStyle.danger),
           "ban": ("Ban author", discord.ButtonStyle.danger), "dismiss": ("Dismiss", discord.ButtonStyle.secondary),
           "history": ("History", discord.ButtonStyle.secondary),
           "accept": ("Accept appeal", discord.ButtonStyle.success),
           "reject": ("Reject appeal", discord.ButtonStyle.danger)}
BAN_MODAL_RE = re.compile(r"dalle:banmodal:(?P<case>[0-9]+)")
STATUS_COLOURS = {"open": discord.Colour.orange(), "approved": discord.Colour.green(),
                  "removed": discord.Colour.red(), "dismissed": discord.Colour.light_grey(),
                  "closed": discord.Colour.dark_grey(), "accepted": discord.Colour.green(),
                  "rejected": discord.Colour.red()}


def moderation_of(interaction: discord.Interaction) -> Any:
    """The ``bot.moderation.ModerationService`` of the bot the interaction reached."""
    return service_of(interaction).moderation


def moderator_of(interaction: discord.Interaction) -> Moderator:
    """The clicker as Discord described them in this interaction: roles, and Manage Messages in this channel."""
    roles = tuple(role.id for role in getattr(interaction.user, "roles", ()))
    return Moderator(user_id=interaction.user.id, guild_id=interaction.guild_id, role_ids=roles,
                     can_manage_messages=interaction.permissions.manage_messages, channel_id=interaction.channel_id)


def case_embed(case: CaseView) -> discord.Embed:
    prompt = discord.utils.escape_markdown(case.prompt or "")
    embed = discord.Embed(title=f"Case #{case.case_id} · {case.source} · {case.status}",
                          description=f"**{prompt[:1000]}**" if prompt else None,
                          colour=STATUS_COLOURS.get(case.status, discord.Colour.default()))
    embed.add_field(name="Member" if case.image_id is None else "Author",
                    value=f"<@{case.author_id}>" if case.author_id else "unknown")
    embed.add_field(name="Seed", value=f"`{case.seed}`" if case.seed is not None else "–")
    embed.add_field(name="Model", value=f"`{case.model_id}`" if case.model_id else "–")
    scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(case.safety_scores.items()))
    embed.add_field(name="Safety scores", value=scores or "–", inline=False)
    if case.reason:
        embed.add_field(name="Their appeal" if case.source == "appeal" else "Opened because",
                        value=case.reason[:1000], inline=False)
    if case.details:
        lines = [f"• {discord.utils.escape_markdown(p[:150])}" for p in case.details]
        embed.add_field(name="Latest refused prompts", value="\n".join(lines)[:1024], inline=False)
    if case.reports:
        lines = [f"<@{r.user_id}>: {r.reason or 'other'}" + (f" — {r.note[:200]}" if r.note else "")
                 for r in case.reports[:10]]
        embed.add_field(name=f"Reports ({len(case.reports)})", value="\n".join(lines)[:1024], inline=False)
    if case.guild_id and case.channel_id and case.public_message_id:
        link = f"https://discord.com/channels/{case.guild_id}/{case.channel_id}/{case.public_message_id}"
        embed.add_field(name="Public message", value=link, inline=False)
    if case.note:
        embed.add_field(name="Closed by the bot", value=case.note[:1000], inline=False)
    if case.actions:
        lines = [f"{a.action} by {_who(a.moderator_id)} <t:{int(a.at.timestamp())}:f>" + (f": {a.reason}" if a.reason
                                                                                         else "")
                 for a in case.actions[-10:]]
        embed.add_field(name="Actions", value="\n".join(lines)[:1024], inline=False)
    embed.set_footer(text=f"image {case.image_id} · generation {case.generation_id}" if case.image_id is not None
                     else f"member {case.author_id}")
    return embed


def _who(moderator_id: int) -> str:
    """A moderator's mention; 0 (``SYSTEM_MODERATOR``) is the bot acting by itself."""
    return "the bot" if moderator_id == 0 else f"<@{moderator_id}>"


class ReviewButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"dalle:case:(?P<action>approve|remove|ban|dismiss|history|accept|reject):(?P<case>[0-9]+)"):
    def __init__(self, action: str, case_id: int) -> None:
        label, style = _LABELS[action]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"dalle:case:{action}:{case_id}"))
        self.action = action
        self.case_id = case_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(match["action"], int(match["case"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        moderation = moderation_of(interaction)
        actor = moderator_of(interaction)
        if self.action == "ban":  # the form opens for moderators only; its submission is checked again
            if not await moderation.is_moderator(actor.guild_id, actor.role_ids, actor.can_manage_messages):
                await interaction.response.send_message(str(NotModerator()), ephemeral=True)
                return
            await interaction.response.send_modal(BanModal(self.case_id))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            if self.action == "history":
                author, record = await moderation.history(self.case_id, actor)
                text = history_text(author, record)
            elif self.action in ("accept", "reject"):  # an appeal (bot.appeals)
                text = (await getattr(service_of(interaction).appeals, self.action)(self.case_id, actor)).message
            else:
                text = (await getattr(moderation, self.action)(self.case_id, actor)).message
        except (NotModerator, CaseNotFound, ValueError) as exc:
            text = str(exc)
        await interaction.edit_original_response(content=text)


class ReviewView(discord.ui.View):
    """Approve, Remove, Dismiss while the case is open; Ban author and History always. A member's refusal
    pattern: Ban, Dismiss, History; an appeal: Accept and Reject while open, History always."""

    def __init__(self, case_id: int, open_case: bool, source: str = "auto") -> None:
        super().__init__(timeout=None)
        for action in SOURCE_ACTIONS.get(source, ACTIONS):
            if open_case or action in ("ban", "history"):
                self.add_item(ReviewButton(action, case_id))


class BanModal(discord.ui.Modal):
    """The ban form; its submission is handled by :func:`handle_ban_submit` from the payload alone."""

    duration: discord.ui.TextInput = discord.ui.TextInput(
        label="Duration: 30m, 12h, 7d, 2w or permanent", custom_id="duration", max_length=20, placeholder="7d")
    reason: discord.ui.TextInput = discord.ui.TextInput(
        label="Reason (the user is told)", custom_id="reason", style=discord.TextStyle.paragraph, max_length=300)

    def __init__(self, case_id: int) -> None:
        super().__init__(title=f"Ban the author of case #{case_id}", custom_id=f"dalle:banmodal:{case_id}",
                         timeout=600)


async def handle_ban_submit(interaction: discord.Interaction) -> bool:
    """Ban from a submitted ban form (the submitter is checked again); False if it is not one of ours."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return False
    match = BAN_MODAL_RE.fullmatch(str((interaction.data or {}).get("custom_id", "")))
    if match is None:
        return False
    values = modal_values(interaction.data)
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        result = await moderation_of(interaction).ban_author(int(match["case"]), moderator_of(interaction),
                                                            values.get("duration", ""), values.get("reason", ""))
        text = result.message
    except (NotModerator, CaseNotFound, ValueError) as exc:
        text = str(exc)
    await interaction.edit_original_response(content=text)
    return True


def cases_text(cases: list[Any], which: str = "open") -> str:
    if not cases:
        return "No open cases." if which == "open" else "No cases yet."
    lines = [f"**{'Open cases, oldest first' if which == 'open' else 'Cases, newest first'}**"]
    for case in cases:
        when = int(case.opened_at.timestamp())
        lines.append(f"#{case.id} · {case.source} · {case.status} · opened <t:{when}:R>"
                     + (f" · {case.reason[:80]}" if case.reason else ""))
    return "\n".join(lines)[:2000]


def history_text(author: int | None, record: Any) -> str:
    if author is None or record is None:
        return "This case has no author on record."
    lines = [f"**History of <@{author}> in this server**",
             f"{record.generations} generation(s) · {record.refusals} refused prompt(s) · "
             f"{record.live_strikes} live strike(s) ({record.strikes} ever) · {record.reports_made} report(s) made"
             + (" · banned by the operator" if record.globally_banned else "")]
    for ban in record.bans:
        state = "lifted" if ban.lifted_at else format_until(ban.expires_at)
        lines.append(f"{ban.kind} by {_who(ban.moderator_id)} {state}: {ban.reason or '–'}")
    if record.cases:
        lines.append("cases: " + ", ".join(f"#{c.id} {c.status}" for c in record.cases))
    return "\n".join(lines)[:2000]
