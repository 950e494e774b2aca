"""The repository's parts, one module per kind of data, composed into :class:`store.repository.Repository`.

``base``: sessions, the database clock and the shared transaction patterns · ``generations``: generations and
the job queue (claims, leases, take-over, delivery) · ``images``: a generation's images · ``feedback``: votes,
reports and their export for training · ``moderation``: cases, actions, user state (bans, strikes, opt-out) and
refusals · ``guilds``: per-guild settings · ``registry``: model checkpoints and training runs ·
``dataset``: judged images for the feedback dataset · ``privacy``: a user's export and deletion.
"""
