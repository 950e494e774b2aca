"""The grid image a result message leads with: the posted images in rank order, as near a square as they go."""

from __future__ import annotations

import io
import logging
import math

from PIL import Image as PILImage

from bot.outcome import StoredImage

log = logging.getLogger(__name__)


def grid_png(images: list[StoredImage], max_bytes: int | None = None) -> bytes:
    """A near-square grid of the images in rank order (best top-left); shrunk until it fits ``max_bytes``.
    Images with no PNG (the file is gone) or an unreadable one are left out."""
    tiles = []
    for im in images:
        try:
            tiles.append(PILImage.open(io.BytesIO(im.png)).convert("RGB"))
        except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError
            log.warning("image %s is left out of the grid: its PNG is missing or unreadable", im.id)
    if not tiles:
        raise ValueError("no images to put in a grid")
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    w, h = tiles[0].size
    scale = 1.0
    while True:
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = PILImage.new("RGB", (cols * tw, rows * th), (255, 255, 255))
        for k, tile in enumerate(tiles):
            canvas.paste(tile.resize((tw, th)), ((k % cols) * tw, (k // cols) * th))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")  # optimize=True: 5x the CPU (30 vs 6 ms a 3x3 grid) for 6% fewer bytes
        data = buf.getvalue()
        if max_bytes is None or len(data) <= max_bytes or tw <= 16:
            return data
        scale *= 0.7
