"""The one image decoder: every recipe and integration reads image files through ``read_image``."""
from __future__ import annotations

from pathlib import Path


class UnreadableImage(ValueError):
    """An image file that cannot be decoded (missing, truncated, not an image); the message names it."""


def read_image(path: str | Path, mode: str = "RGB"):
    """The image at ``path`` as a PIL image in ``mode``, every pixel decoded (a truncated file fails here)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise UnreadableImage(f"cannot read image {path}: {err}") from None
