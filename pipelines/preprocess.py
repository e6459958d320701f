"""The evaluation preprocessing, written once for training's evaluation, Serve and batch labeling, so that
they cannot drift apart: decode -> resize the short side to size / crop_pct (bicubic) -> centre crop ->
normalise with the ImageNet mean and std.

The first three steps run on CPUs (``eval_transform``: image bytes -> uint8 HWC), or on the device for
images decoded there (``eval_transform_tensor``), the last on the model's device (``normalize``: uint8 NHWC
-> float NCHW), so that images travel as uint8, 4x less than float32.
``open_image`` refuses an image whose header declares more than ``max_pixels`` before anything is
decoded (a decompression bomb is a small file that decodes to gigabytes).

torch and torchvision are imported inside the two device-side functions: the processes that run only the
CPU half (decode tasks, Ray Data's coordinators, which unpickle it) then never import them, about 3 s of CPU
each.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from crossvit.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size

if TYPE_CHECKING:
    import torch

# 50 megapixels: a 48 MP phone photo (8000 x 6000) passes. What a tiny hostile file of each format costs to
# decode at this limit is measured in benchmarks/RESULTS.md ("Decoding costs"): a JPEG is decoded at a
# reduced DCT scale (a few MB), a PNG or WebP in full (up to about 750 MB and 1 s of CPU for a 2 KB WebP).
MAX_PIXELS = 50_000_000
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: what Pillow calls the JPEGs of many cameras and phones


class ImageTooLargeError(ValueError):
    """The image declares more pixels than allowed."""


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open (not decode) an image, checking its declared size first. Raises what Pillow raises for bytes
    that are no image it reads (PIL.UnidentifiedImageError), and ImageTooLargeError. Only the first frame of
    a multi-frame image (an animated WebP or PNG, an MPO) is ever decoded: Pillow opens at frame 0 and
    nothing here seeks."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own limit (about 179 megapixels) came first
        raise ImageTooLargeError(f"{e} (more than the {max_pixels:,} allowed)") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLargeError(f"{img.width}x{img.height} pixels is more than the {max_pixels:,} allowed")
    return img


def open_reduced(data: bytes, need_w: float, need_h: float, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, float]:
    """Decode an image as RGB, a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least
    need_w x need_h in original pixels' terms (no detail the output could hold is lost); returns the image
    and its scale relative to the original."""
    img = open_image(data, max_pixels)
    width = img.width
    if img.format in JPEG_FORMATS:
        img.draft("RGB", (math.ceil(need_w), math.ceil(need_h)))
    img = img.convert("RGB")
    return img, img.width / width


def eval_transform(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Resize the short side to size / crop_pct (bicubic), centre-crop size x size -> uint8 HWC. One
    resample from the (reduced) decode to the crop, as torchvision's Resize + CenterCrop would give."""
    with open_image(data, max_pixels) as probe:
        W, H = probe.size
    factor = eval_resize_size(size) / min(W, H)
    img, scale = open_reduced(data, W * min(1.0, factor), H * min(1.0, factor), max_pixels)
    return _resize_crop(img, W, H, scale, size)


def eval_transform_array(pixels: np.ndarray, size: int) -> np.ndarray:
    """``eval_transform`` on decoded pixels (uint8 H x W x 3, e.g. an OIP tensor input) -> uint8 HWC."""
    H, W = pixels.shape[:2]
    return _resize_crop(Image.fromarray(pixels, "RGB"), W, H, 1.0, size)


def _resize_crop(img: Image.Image, W: int, H: int, scale: float, size: int) -> np.ndarray:
    """The resize and centre crop of a W x H image decoded at ``scale`` of its size (a reduced JPEG)."""
    factor = eval_resize_size(size) / min(W, H)
    new_w, new_h = round(W * factor), round(H * factor)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)  # as torchvision's CenterCrop
    k = scale / factor  # the crop box in decoded pixels
    box = (left * k, top * k, (left + size) * k, (top + size) * k)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box))


def eval_transform_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """``eval_transform`` on an image decoded on a device (uint8 CHW, e.g. by nvJPEG): the same resize of
    the short side (bicubic, antialiased) and centre crop, with torchvision's tensor ops -> uint8 CHW."""
    from torchvision.transforms import InterpolationMode  # here: see the module's docstring
    from torchvision.transforms.v2 import functional as TF

    resized = TF.resize(img, [eval_resize_size(size)], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size])


def normalize(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> float (B, 3, H, W), normalised with the ImageNet mean and std."""
    import torch  # here: see the module's docstring

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
