"""User images -> the training data's form: uint8 [n, 28, 28], one channel, light object on black.

CONVERSION is the help text's paragraph, kept beside the code that does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

CONVERSION = (
    "Images are converted the way the training data was made: colour is turned into one grey channel "
    "(ITU-R 601-2 luma), the image is scaled so that its longer side is the model's 28 pixels (aspect kept, "
    "Lanczos) and centred on a black square, and pixel values stay 0-255 (a .npy of floats in [0, 1] is scaled "
    "by 255). The training images show a light object on a black background; pass --invert for dark-on-light "
    "pictures such as a scanned drawing."
)


class UnreadableImage(UserError):
    exit_code = 2


@dataclass
class Item:
    name: str  # the file, with [i] for one image of a .npy stack
    image: np.ndarray  # uint8 [H, W] as the model reads it


def load_items(paths: list[str], size: tuple[int, int], invert: bool) -> list[Item]:
    items: list[Item] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise UnreadableImage(f"{path} does not exist or is not a file; pass PNG or JPEG images or a .npy array")
        arrays = _npy(path) if path.suffix.lower() == ".npy" else [(str(path), _picture(path))]
        for name, array in arrays:
            image = _fit(array, size)
            items.append(Item(name, 255 - image if invert else image))
    return items


def _picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):  # transparency over black, like the training background
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UnreadableImage(f"{path} cannot be decoded as an image ({err}); pass PNG or JPEG files, or a .npy array "
                              "of 28x28 images") from None


def _npy(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UnreadableImage(f"{path} cannot be read as a .npy array ({err})") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] in (1, 3, 4):  # [n, H, W, C]
        array = array[..., :3].mean(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    if array.ndim != 3 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.number):
        raise UnreadableImage(f"{path} holds an array of shape {array.shape} and dtype {array.dtype}; expected images "
                              "[n, H, W] (or [H, W], or [n, H, W, channels]) of numbers")
    if np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
        array = array * 255.0
    array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    return [(f"{path}[{i}]", image) for i, image in enumerate(array)]


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape == tuple(size):
        return image
    from PIL import Image

    h, w = size
    scale = min(h / image.shape[0], w / image.shape[1])
    new = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(image).resize(new, Image.LANCZOS), dtype=np.uint8)
    canvas = np.zeros((h, w), dtype=np.uint8)
    top, left = (h - resized.shape[0]) // 2, (w - resized.shape[1]) // 2
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return canvas
