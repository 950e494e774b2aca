"""What a variation keeps of the image it varies: the top rows (a quarter) of its stored image tokens.

A variation used to be the same prompt with another seed, which gives an unrelated picture. Forcing the first
rows of the chosen image's tokens (the engine's ``GenerationRequest.image_prefix``) and sampling the rest keeps
its composition: bench/RESULTS.md ("Variations") measures how much closer that stays to the chosen image.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from store.models import GenerationKind

log = logging.getLogger(__name__)

# the share of the chosen image's token rows a variation keeps: the top quarter. On the demo model a variation that
# keeps an eighth, a quarter or half of the rows stays about as close to the chosen image (CLIP cosine 0.90-0.92,
# against 0.72 for a seed-only variation), and the less it keeps, the more its 9 images differ from each other
# (bench/RESULTS.md, "Variations")
KEEP_ROWS = 0.25


def kept_prefix(tokens: Any, keep: float = KEEP_ROWS) -> tuple[int, ...]:
    """The tokens of the top ``keep`` of an image's rows (a square grid of tokens; whole rows, at least one and
    never all of them), as the engine's ``image_prefix``. A non-square sequence keeps the same share of tokens."""
    flat = [int(t) for t in (tokens if tokens is not None else ())]
    if len(flat) < 2:
        return ()
    side = math.isqrt(len(flat))
    if side * side != len(flat):
        return tuple(flat[: max(1, min(len(flat) - 1, int(len(flat) * keep)))])
    rows = max(1, min(side - 1, int(side * keep)))
    return tuple(flat[: rows * side])


async def variation_prefix(repo: Any, generation: Any) -> tuple[int, ...]:
    """The image prefix a queued generation is sampled with: the kept rows of its parent image for a variation
    (read from the database, so a resumed or taken-over job keeps the same prefix), else none. A parent image
    that is gone, has no stored tokens or is hidden (removed, or flagged and not approved, whatever the guild's
    flagged mode) gives a seed-only variation, as before."""
    if getattr(generation, "kind", None) != GenerationKind.VARIATION.value or not generation.parent_image_id:
        return ()
    image = await repo.get_image(generation.parent_image_id)
    if image is not None and image.hidden:  # removed or withheld since the variation was queued: copy none of it
        log.info("variation %s: image %s is hidden now; a seed-only variation", generation.id, image.id)
        return ()
    tokens = None if image is None else image.tokens
    if tokens is None:
        log.info("variation %s: image %s has no stored tokens; a seed-only variation", generation.id,
                 generation.parent_image_id)
        return ()
    return kept_prefix(tokens)
