"""Persistent message components, one module per message kind. Every custom id carries the generation or image
id it acts on (``dalle:<action>:<id>``) and is decoded by a ``discord.ui.DynamicItem``, so buttons on messages
posted before a restart keep working (peers.md #3, #4, #8): nothing is looked up in process memory.

The items call ``interaction.client.service`` (a ``bot.service.GenerationService``) and answer ephemerally.
"""

from __future__ import annotations

from bot.views.delete import DeleteButton
from bot.views.image_panel import PickSelect
from bot.views.queue import CancelButton
from bot.views.result import ReportButton, RerollButton, VariationButton, VoteButton, VoteReasonButton
from bot.views.review import ReviewButton

DYNAMIC_ITEMS = (RerollButton, VariationButton, VoteButton, VoteReasonButton, ReportButton, CancelButton,
                 ReviewButton, PickSelect, DeleteButton)
