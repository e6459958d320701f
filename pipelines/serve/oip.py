"""The Open Inference Protocol (KServe v2 REST, what Triton, KServe and Seldon speak): parsing an infer
request and writing its response, with the binary tensor data extension, so that images travel as bytes and
not as JSON arrays. Pure functions over bytes; the routes are in pipelines/serve/app.py.

The model has one input, ``images``, either
- ``BYTES`` of shape ``[N]``: one encoded image (JPEG, PNG, WebP) per element; in the binary extension each
  element is a 4-byte little-endian length and the bytes; in JSON, each element is the file base64-encoded
  (JSON strings cannot hold arbitrary bytes; KServe's examples send images this way), or
- ``UINT8`` of shape ``[N, H, W, 3]``: decoded RGB pixels, resized and centre-cropped like a decoded file;
and two outputs: ``probabilities`` (``FP32 [N, classes]``) and ``classes`` (``BYTES [N, k]``, the top-k class
names, best first; ``k`` from the request's ``parameters.top_k``, 5 by default).

The spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ and Triton's
binary_data extension. Written here because no library owns the server side without its server: KServe's
``kserve`` package parses it inside its own FastAPI server (pulling pandas and its pins), Triton's in C++.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from pipelines.serve.errors import ClientError

HEADER = "inference-header-content-length"  # the binary extension: the JSON part's length
INPUT = "images"
OUTPUTS = ("probabilities", "classes")


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes] | None  # BYTES: encoded files
    pixels: np.ndarray | None  # UINT8 (N, H, W, 3)
    top_k: int | None
    binary_outputs: set[str]  # outputs to send in the binary part
    outputs: tuple[str, ...]  # the outputs asked for (all when none are named)


def _split_bytes(raw: memoryview, count: int) -> list[memoryview]:
    """BYTES elements in the binary extension: each a uint32 little-endian length and that many bytes
    (views into the body: no copies)."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ClientError(400, "a BYTES element's 4-byte length is cut off")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise ClientError(400, f"a BYTES element declares {n:,} bytes, more than the data holds")
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    if len(out) != count:
        raise ClientError(400, f"the input's shape says {count} elements, its data holds {len(out)}")
    return out


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(400, f"{what} must be a JSON object")
    return value


def parse_request(body: bytes | bytearray, json_length: str | None, max_images: int) -> InferRequest:
    """An infer request's body (and its Inference-Header-Content-Length, if any) -> what to classify. Every
    malformed request is a ClientError (400) that says what is wrong; sizes are checked before anything is
    allocated for them."""
    view = memoryview(body)
    if json_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", json_length) or int(json_length) > len(view):
            raise ClientError(400, f"{HEADER} {json_length!r} is not a length within the body")
        header_bytes, binary = view[: int(json_length)], view[int(json_length) :]
    else:
        header_bytes, binary = view, view[len(view) :]
    try:
        header = json.loads(bytes(header_bytes))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ClientError(400, f"the request's JSON cannot be parsed: {str(e)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ClientError(400, "an infer request is a JSON object with a list of 'inputs'")
    inputs = header["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT:
        raise ClientError(400, f"one input named {INPUT!r} (BYTES [N] images, or UINT8 [N,H,W,3] pixels)")
    (spec,) = inputs
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(_int(d) and d >= 0 for d in shape):
        raise ClientError(400, f"the input's shape {shape!r} is not a list of sizes")
    count = shape[0]
    if not 1 <= count <= max_images:
        raise ClientError(400, f"{count} images in one request: 1..{max_images}")
    size = _dict(spec.get("parameters"), "the input's parameters").get("binary_data_size")
    if size is not None and (not _int(size) or size != len(binary)):
        raise ClientError(400, f"binary_data_size {size!r}: the body's binary part holds {len(binary):,} bytes")
    raw = binary if size is not None else None

    images = pixels = None
    if datatype == "BYTES":
        if len(shape) != 1:
            raise ClientError(400, f"BYTES images have shape [N], not {shape}")
        if raw is not None:
            images = _split_bytes(raw, count)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
                raise ClientError(400, f"BYTES data in JSON: a list of {count} base64 strings (or use binary data)")
            try:
                images = [base64.b64decode(d, validate=True) for d in data]
            except binascii.Error:
                raise ClientError(400, "BYTES data in JSON must be base64-encoded image files") from None
    elif datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3 or 0 in shape:
            raise ClientError(400, f"UINT8 pixels have shape [N, H, W, 3], not {shape}")
        expected = math.prod(shape)
        if raw is not None:
            if len(raw) != expected:
                raise ClientError(400, f"shape {shape} needs {expected:,} bytes of UINT8, the data holds {len(raw):,}")
            pixels = np.frombuffer(raw, np.uint8).reshape(shape)
        else:
            if expected > len(view):  # more integers than the body has characters: it cannot hold them
                raise ClientError(400, f"UINT8 data in JSON: {expected:,} integers 0..255 for shape {shape}")
            values = np.asarray(spec.get("data"), dtype=object).ravel()
            if values.size != expected or not all(_int(v) and 0 <= v <= 255 for v in values):
                raise ClientError(400, f"UINT8 data in JSON: {expected:,} integers 0..255 for shape {shape}")
            pixels = values.astype(np.uint8).reshape(shape)
    else:
        raise ClientError(400, f"the input's datatype {datatype!r}: BYTES (encoded images) or UINT8 (pixels)")

    parameters = _dict(header.get("parameters"), "the request's parameters")
    top_k = parameters.get("top_k")
    if top_k is not None and not _int(top_k):
        raise ClientError(400, f"top_k must be an integer, not {top_k!r}")
    asked = header.get("outputs") or []
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ClientError(400, "'outputs' must be a list of objects with a 'name'")
    if unknown := [o.get("name") for o in asked if o.get("name") not in OUTPUTS]:
        raise ClientError(400, f"unknown outputs {unknown}: this model has {list(OUTPUTS)}")
    all_binary = bool(parameters.get("binary_data_output"))
    binary_outputs = {
        o["name"] for o in asked if _dict(o.get("parameters"), "an output's parameters").get("binary_data")
    }
    outputs = tuple(o["name"] for o in asked) or OUTPUTS
    request_id = header.get("id")
    return InferRequest(
        str(request_id) if request_id is not None else None,
        images,
        pixels,
        top_k,
        set(OUTPUTS) if all_binary else binary_outputs,
        outputs,
    )


def _binary(value: np.ndarray | list[list[str]]) -> bytes:
    if isinstance(value, np.ndarray):
        return value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    return b"".join(struct.pack("<I", len(b)) + b for row in value for b in (s.encode() for s in row))


def encode_response(
    model: str, version: int, request: InferRequest, probabilities: np.ndarray, classes: list[list[str]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON followed by the binary outputs (with the JSON part's
    length in Inference-Header-Content-Length)."""
    values = {"probabilities": ("FP32", probabilities.astype(np.float32)), "classes": ("BYTES", classes)}
    outputs, parts = [], []
    for name in request.outputs:
        datatype, value = values[name]
        shape = list(value.shape) if isinstance(value, np.ndarray) else [len(value), len(value[0]) if value else 0]
        out = {"name": name, "datatype": datatype, "shape": shape}
        if name in request.binary_outputs:
            data = _binary(value)
            out["parameters"] = {"binary_data_size": len(data)}
            parts.append(data)
        else:
            out["data"] = (  # JSON has no NaN (a diverged model): null instead
                [v if math.isfinite(v) else None for v in value.ravel().tolist()]
                if isinstance(value, np.ndarray)
                else [s for row in value for s in row]
            )
        outputs.append(out)
    header = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    head = json.dumps(header).encode()
    if not parts:
        return head, {"content-type": "application/json"}
    return head + b"".join(parts), {"content-type": "application/octet-stream", HEADER: str(len(head))}
