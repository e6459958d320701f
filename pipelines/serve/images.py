"""A request's images -> the model's input, with every check a hostile file needs before it is decoded.

On the CPU (``decode``): the format and the declared pixel count from the header, then the evaluation
preprocessing that training used (pipelines/preprocess.py). On a GPU replica (``decode_on_device``): the
same checks on the CPU, then the batch's JPEGs (up to DEVICE_MAX_PIXELS each) decoded together by nvJPEG
and the evaluation transform applied on the device (pipelines/device.py); other formats, larger JPEGs and a
JPEG that nvJPEG refuses are decoded on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import UnidentifiedImageError

from pipelines.preprocess import JPEG_FORMATS, ImageTooLargeError, eval_transform, eval_transform_tensor, open_image
from pipelines.serve.errors import ClientError

FORMATS = (*JPEG_FORMATS, "PNG", "WEBP")


# The most pixels a JPEG may have to be decoded on the device: nvJPEG decodes at full size (16 such images in a
# batch: 768 MB of uint8 on the GPU at most); a larger one (a 48 MP photo) takes the CPU path, which decodes
# it at a reduced DCT scale (about 20 ms, benchmarks/RESULTS.md "Decoding costs").
DEVICE_MAX_PIXELS = 16_000_000


def check(data: bytes, max_pixels: int) -> tuple[str, int]:
    """The image's format and pixel count, after refusing what must not be decoded: no image, a format not
    accepted, more pixels than allowed. Reads the header only."""
    if not data:
        raise ClientError(400, "empty body: send an image")
    try:
        with open_image(data, max_pixels) as probe:
            if probe.format not in FORMATS:
                raise ClientError(415, f"{probe.format} images are not accepted: send jpg, png or webp")
            return probe.format, probe.width * probe.height
    except ImageTooLargeError as e:
        raise ClientError(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ClientError(400, "the body is not an image (jpg, png or webp)") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for damaged headers
        raise ClientError(400, f"the image cannot be decoded: {e}") from None


def decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Checked image bytes -> uint8 (size, size, 3) on the CPU."""
    check(data, max_pixels)
    try:
        return eval_transform(data, size, max_pixels)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for damaged data
        raise ClientError(400, f"the image cannot be decoded: {e}") from None


def for_device(data: bytes, max_pixels: int) -> bool:
    """Whether a GPU replica decodes this image on its GPU: a checked JPEG of at most DEVICE_MAX_PIXELS."""
    kind, pixels = check(data, max_pixels)
    return kind in JPEG_FORMATS and pixels <= DEVICE_MAX_PIXELS


def decode_batch_on_device(images: list[bytes], size: int, device: torch.device, max_pixels: int) -> list:
    """Checked JPEG bytes -> per image, uint8 (size, size, 3) on ``device``, or the ClientError that answers
    it. The batch's JPEGs go to nvJPEG in one call; one it cannot decode is tried on the CPU (a progressive
    or CMYK JPEG that Pillow reads), so that it gets the same answer as on a CPU replica."""
    from pipelines.device import decode_all  # torchvision: imported where images are decoded

    out: list = [None] * len(images)
    for i, img in enumerate(decode_all(images, [f"image {i}" for i in range(len(images))], device)):
        if img is not None:
            out[i] = eval_transform_tensor(img, size).permute(1, 2, 0)
            continue
        try:
            out[i] = torch.from_numpy(decode(images[i], size, max_pixels)).to(device)
        except ClientError as e:
            out[i] = e
    return out
