"""Reader for a folder of image + caption files (``x.jpg`` + ``x.txt``), streamed in sorted order.

Images are converted to RGB and, when ``image_size`` is given, resized so the short side is ``image_size``
(LANCZOS) and centre-cropped to a square — the reference encoding notebooks' preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class FolderItem:
    """One image with its caption; ``key`` is the path relative to the root without extension."""

    key: str
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    path: Path


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """Resize so the short side is ``size`` (LANCZOS), centre-crop to ``size``×``size``; uint8 RGB."""
    if size <= 0:
        raise ValueError("size must be positive")
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def list_pairs(root: str | Path, recursive: bool = True) -> list[tuple[Path, Path | None]]:
    """Sorted (image path, caption path or None) pairs under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = root.rglob("*") if recursive else root.iterdir()
    images = sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    out = []
    for p in images:
        txt = p.with_suffix(".txt")
        out.append((p, txt if txt.is_file() else None))
    return out


def iter_folder(root: str | Path, *, image_size: int | None = None, missing_caption: str = "skip",
                on_bad_image: str = "skip", recursive: bool = True) -> Iterator[FolderItem]:
    """Stream (image, caption) items from ``root``.

    ``missing_caption``: ``"skip"`` the image, use ``"empty"`` caption, or ``"error"``.
    ``on_bad_image``: ``"skip"`` (logged) or ``"error"`` for files PIL cannot read.
    """
    if missing_caption not in ("skip", "empty", "error"):
        raise ValueError("missing_caption must be 'skip', 'empty' or 'error'")
    if on_bad_image not in ("skip", "error"):
        raise ValueError("on_bad_image must be 'skip' or 'error'")
    root = Path(root)
    for img_path, txt_path in list_pairs(root, recursive):
        if txt_path is None:
            if missing_caption == "error":
                raise FileNotFoundError(f"no caption file for {img_path} (expected {img_path.with_suffix('.txt')})")
            if missing_caption == "skip":
                continue
            caption = ""
        else:
            caption = txt_path.read_text(encoding="utf8", errors="replace").strip()
        try:
            with Image.open(img_path) as im:
                im.load()
                array = center_crop_resize(im, image_size) if image_size else np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            if on_bad_image == "error":
                raise ValueError(f"cannot read image {img_path}: {exc}") from exc
            log.warning("skipping unreadable image %s: %s", img_path, exc)
            continue
        key = str(img_path.relative_to(root).with_suffix(""))
        yield FolderItem(key=key, image=array, caption=caption, path=img_path)
