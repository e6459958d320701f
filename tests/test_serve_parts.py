"""The Serve application's parts on their own (fast tier: no Ray, no server): following the registry
(pipelines/serve/model.py), tokens (auth.py), the Open Inference Protocol's codec (oip.py), the image checks
(images.py) and the settings' validation."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import png_header
from PIL import Image

from pipelines.preprocess import eval_transform
from pipelines.serve import images, oip
from pipelines.serve.auth import Token, TokenError
from pipelines.serve.errors import ClientError
from pipelines.serve.model import Served
from pipelines.serve.settings import ServeSettings
from pipelines.storage import StorageError


# -- following the registry --------------------------------------------------------------------------------
class FakeRegistry:
    """The registry calls a replica's Served makes: an alias that names ``version``, reads that fail while
    ``failing`` is set, and versions in ``broken`` that fail to load (a checksum)."""

    def __init__(self, version: int = 1):
        self.version, self.failing, self.broken = version, None, set()
        self.loads: list[int] = []

    def read_alias(self, model: str, alias: str):
        if self.failing:
            raise self.failing
        return {"version": self.version, "lineage": list(range(1, self.version + 1))}, "tag"

    def get(self, model: str, number: int):
        return SimpleNamespace(number=number)

    def load(self, version):
        self.loads.append(version.number)
        if version.number in self.broken:
            raise ValueError(f"version {version.number}: sha256 does not match")
        if self.failing:
            raise self.failing
        return SimpleNamespace(version=version)


def follower(reg: FakeRegistry, poll_s: float = 3600.0) -> Served:
    """What a replica serves with no canary: production, followed by the watcher thread."""
    return Served(reg, "tiny", "production", None, "", poll_s, reg.load)


def test_a_registry_that_cannot_be_read_is_reported_and_forgotten_once_it_can_be_read_again():
    """The first poll fails (the watcher's old code died of an UnboundLocalError there), later polls fail
    too: the watcher lives on, serves version 1, says the registry is unreadable, refuses nothing; once the
    registry answers again, nothing is left of the fault."""
    reg = FakeRegistry()
    f = follower(reg)
    reg.failing = StorageError("cannot read s3://r/tiny/aliases/production.json: S3 blip")
    for _ in range(3):
        assert f.check_now(timeout=5)
    state = f.production.status()
    assert f.alive and f.production.current.version.number == 1
    assert "S3 blip" in state.registry_error and state.refused is None and state.load_error is None
    reg.failing = None
    assert f.check_now(timeout=5)
    assert f.production.status().registry_error is None and f.production.status().refused is None


def test_a_transient_fault_while_loading_a_new_version_is_tried_again_not_refused():
    reg = FakeRegistry()
    f = follower(reg)
    reg.version = 2
    reg.failing = OSError("connection reset")
    reg.read_alias = lambda m, a: ({"version": 2, "lineage": [1, 2]}, "tag")  # the alias reads, the load fails
    assert f.check_now(timeout=5)
    assert f.production.status().refused is None and "connection reset" in f.production.status().registry_error
    reg.failing = None
    assert f.check_now(timeout=5)
    assert f.production.current.version.number == 2 and f.production.status().registry_error is None


def test_a_forced_check_does_not_load_a_refused_version_again():
    """A broken version is refused once; every forced check after it (an admin reload) leaves it alone
    until the alias moves, instead of downloading and hashing it again each time."""
    reg = FakeRegistry()
    f = follower(reg)
    reg.version, reg.broken = 2, {2}
    for _ in range(4):
        assert f.check_now(timeout=5)
    assert reg.loads == [1, 2] and f.production.status().refused == 2 and "sha256" in f.production.status().load_error
    reg.version = 1  # rolled back: the alias names the served version; nothing is refused any more
    assert f.check_now(timeout=5)
    assert f.production.status().refused is None and f.production.status().load_error is None


def test_a_check_that_does_not_end_in_time_says_so():
    reg = FakeRegistry()
    f = follower(reg)
    gate = threading.Event()
    slow = reg.load
    reg.load = f._load = lambda v: (gate.wait(10), slow(v))[1]
    reg.version = 2
    try:
        assert f.check_now(timeout=0.3) is False  # the reload route answers 504, not a stale 200
    finally:
        gate.set()
    assert f.check_now(timeout=5) and f.production.current.version.number == 2


def test_a_new_replica_starts_with_the_newest_version_of_the_lineage_that_loads():
    reg = FakeRegistry(version=3)
    reg.broken = {3}
    f = follower(reg)
    assert f.production.current.version.number == 2 and f.production.status().refused == 3


@pytest.mark.parametrize("field", ["poll_interval_s", "max_pixels", "max_body_bytes"])
def test_settings_that_would_spin_or_refuse_everything_are_an_error(field):
    with pytest.raises(ValueError, match=f"must be positive: {field}=0"):
        ServeSettings(registry="r", model="m", **{field: 0})
    assert ServeSettings(registry="r", model="m", poll_interval_s="0.5").poll_interval_s == 0.5


# -- tokens ----------------------------------------------------------------------------------------------
def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_an_empty_token_is_an_error_not_auth_off(tmp_path, monkeypatch):
    monkeypatch.setenv("T_EMPTY", "")
    with pytest.raises(TokenError, match="T_EMPTY is set but empty"):
        Token("classification", "T_EMPTY", "")
    (tmp_path / "token").write_text("\n")
    with pytest.raises(TokenError, match="is empty"):
        Token("admin", "UNSET_VARIABLE", str(tmp_path / "token"))
    with pytest.raises(TokenError, match="cannot be read"):
        Token("admin", "UNSET_VARIABLE", str(tmp_path / "missing"))
    assert not Token("admin", "UNSET_VARIABLE", "").configured


def test_token_files_named_by_the_environment_unreadable_files_and_one_token_for_both(tmp_path, monkeypatch):
    """How the RayService mounts its Secrets (a variable names the file); a file that cannot be read is a
    TokenError (a 503 for its requests), not a 500; an admin token equal to the classification token is
    refused (every client could administer)."""
    (tmp_path / "token").write_text("same\n")
    monkeypatch.setenv("CROSSVIT_SERVE_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("CROSSVIT_SERVE_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    settings = ServeSettings(registry="r", model="m")
    assert settings.auth_token_file == settings.admin_token_file == str(tmp_path / "token")
    classify_token = Token("classification", "UNSET_VARIABLE", settings.auth_token_file)
    admin_token = Token("admin", "UNSET_VARIABLE", settings.admin_token_file)
    assert admin_token.same_as(classify_token)
    with pytest.raises(TokenError, match="cannot be read"):
        Token("admin", "UNSET_VARIABLE", str(tmp_path))  # a folder (a mount gone wrong)


def test_a_rotated_token_file_takes_effect_at_the_next_request(tmp_path):
    path = tmp_path / "token"
    path.write_text("first\n")
    token = Token("admin", "UNSET_VARIABLE", str(path))
    assert token.check(bearer("first")) and not token.check(bearer("second")) and not token.check("first")
    path.write_text("second-and-longer\n")  # a rotation (Kubernetes swaps the file)
    assert token.check(bearer("second-and-longer")) and not token.check(bearer("first"))
    path.write_text("")
    with pytest.raises(TokenError, match="is empty"):  # admits nobody (the route answers 503)
        token.check(bearer("second-and-longer"))


# -- the Open Inference Protocol ---------------------------------------------------------------------------
def binary_request(elements: list[bytes], **header) -> tuple[bytes, str]:
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    spec = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [len(elements)],
        "parameters": {"binary_data_size": len(data)},
    }
    head = json.dumps({"inputs": [spec], **header}).encode()
    return head + data, str(len(head))


def test_oip_images_as_binary_bytes_as_base64_json_and_as_pixels():
    body, length = binary_request([b"one", b"\x00two"], id="r-1", parameters={"top_k": 2, "binary_data_output": True})
    parsed = oip.parse_request(body, length, max_images=4)
    assert parsed.images == [b"one", b"\x00two"] and parsed.top_k == 2 and parsed.id == "r-1"
    assert parsed.binary_outputs == {"probabilities", "classes"}
    spec = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"\xff\xd8jpeg").decode()]}
    parsed = oip.parse_request(json.dumps({"inputs": [spec], "outputs": [{"name": "classes"}]}).encode(), None, 4)
    assert parsed.images == [b"\xff\xd8jpeg"] and parsed.outputs == ("classes",) and parsed.binary_outputs == set()
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    spec = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [2, 3, 4, 3],
        "parameters": {"binary_data_size": pixels.nbytes},
    }
    head = json.dumps({"inputs": [spec]}).encode()
    assert np.array_equal(oip.parse_request(head + pixels.tobytes(), str(len(head)), 4).pixels, pixels)
    spec = {"name": "images", "datatype": "UINT8", "shape": [2, 3, 4, 3], "data": pixels.ravel().tolist()}
    assert np.array_equal(oip.parse_request(json.dumps({"inputs": [spec]}).encode(), None, 4).pixels, pixels)


def _request(spec: dict | None = None, **header) -> bytes:
    """A JSON infer request: one BYTES image (base64) unless ``spec`` changes the input."""
    image = {"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"], **(spec or {})}
    return json.dumps({"inputs": [image], **header}).encode()


_CUT, _CUT_LENGTH = binary_request([b"abc"])
OIP_BAD = [
    ("not JSON", b"{nope", None, "cannot be parsed"),
    ("JSON nested too deep", b"[" * 100_000 + b"]" * 100_000, None, "cannot be parsed"),
    ("no inputs", b'{"outputs": []}', None, "list of 'inputs'"),
    ("another input name", _request({"name": "pixels"}), None, "one input named 'images'"),
    ("unknown datatype", _request({"datatype": "FP32"}), None, "BYTES (encoded images) or UINT8"),
    ("a shape of booleans", _request({"shape": [True]}), None, "is not a list of sizes"),
    ("BYTES not base64", _request({"data": ["%%%"]}), None, "base64"),
    ("count and data disagree", _request({"shape": [2]}), None, "a list of 2 base64 strings"),
    ("too many images", _request({"shape": [5], "data": ["AAAA"] * 5}), None, "5 images in one request: 1..4"),
    ("no images", _request({"shape": [0], "data": []}), None, "0 images in one request"),
    (
        "UINT8 of the wrong size",
        _request({"datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [1, 2]}),
        None,
        "12 integers",
    ),
    ("UINT8 out of range", _request({"datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 300]}), None, "0..255"),
    ("UINT8 floats", _request({"datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3.5]}), None, "0..255"),
    ("UINT8 not RGB", _request({"datatype": "UINT8", "shape": [1, 2, 2, 4], "data": [0] * 16}), None, "[N, H, W, 3]"),
    (
        "a shape past any body",
        _request({"datatype": "UINT8", "shape": [1, 2**32, 2**32, 3], "data": []}),
        None,
        "integers",
    ),
    ("parameters not an object", _request(parameters=[1]), None, "the request's parameters must be a JSON object"),
    ("input parameters not an object", _request({"parameters": "x"}), None, "the input's parameters must be"),
    ("outputs not a list", _request(outputs=5), None, "'outputs' must be a list"),
    ("an unknown output", _request(outputs=[{"name": "logits"}]), None, "unknown outputs ['logits']"),
    ("top_k not an integer", _request(parameters={"top_k": "3"}), None, "top_k must be an integer"),
    ("header length past the body", b"{}", "99", "not a length within the body"),
    ("header length not ASCII digits", b"{}", "\u00b2", "not a length within the body"),
    ("a cut-off BYTES element", _CUT[:-2], _CUT_LENGTH, "binary_data_size 7"),  # the data holds 5 of its 7 bytes
]


@pytest.mark.parametrize("name,body,length,message", OIP_BAD, ids=[b[0] for b in OIP_BAD])
def test_oip_requests_that_cannot_be_parsed_are_a_400_that_says_why(name, body, length, message):
    with pytest.raises(ClientError, match=re.escape(message)) as e:
        oip.parse_request(body, length, max_images=4)
    assert e.value.status == 400


def test_oip_binary_elements_that_overrun_their_data_are_refused():
    data = struct.pack("<I", 100) + b"short"
    spec = {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}}
    head = json.dumps({"inputs": [spec]}).encode()
    with pytest.raises(ClientError, match="declares 100 bytes"):
        oip.parse_request(head + data, str(len(head)), 4)


def test_oip_responses_in_json_and_binary():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    classes = [["cat", "dog"], ["fox", "cat"]]
    asked = oip.InferRequest("r-2", [b"a", b"b"], None, 2, {"classes"}, oip.OUTPUTS)
    body, headers = oip.encode_response("tiny", 3, asked, probs, classes)
    n = int(headers[oip.HEADER])
    head = json.loads(body[:n])
    assert head["model_version"] == "3" and head["id"] == "r-2"
    (p, c) = head["outputs"]
    assert p["data"] == pytest.approx(probs.ravel().tolist()) and p["shape"] == [2, 3]
    assert c["shape"] == [2, 2] and c["parameters"]["binary_data_size"] == len(body) - n
    assert oip._split_bytes(body[n:], 4) == [b"cat", b"dog", b"fox", b"cat"]
    plain, headers = oip.encode_response(
        "tiny", 3, oip.InferRequest(None, [b"a"], None, 2, set(), ("classes",)), probs, classes
    )
    assert headers == {"content-type": "application/json"} and json.loads(plain)["outputs"][0]["data"][:2] == [
        "cat",
        "dog",
    ]


# -- hostile images ----------------------------------------------------------------------------------------
def test_the_pixel_limit_is_ours_not_pillows_and_takes_a_48_megapixel_photo():
    """60 MP is below Pillow's own bomb limit (179 MP, and its warning at 89 MP): only our check refuses it.
    A 48 MP phone photo's header (8000 x 6000) passes."""
    with pytest.raises(ClientError, match="8000x7500 pixels is more than the 50,000,000 allowed") as e:
        images.check(png_header(8000, 7500), ServeSettings(registry="r", model="m").max_pixels)
    assert e.value.status == 413
    assert images.check(png_header(8000, 6000), 50_000_000) == ("PNG", 48_000_000)


def test_the_first_frame_of_an_animated_image_is_what_is_classified():
    """Only frame 0 is decoded (Pillow opens there and nothing seeks; benchmarks/hostile.py shows 20 frames
    cost what one does): a change that composited or averaged frames would classify blue here."""
    buf = io.BytesIO()
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    red.save(buf, format="WEBP", save_all=True, append_images=[blue] * 20, lossless=True, duration=10)
    out = images.decode(buf.getvalue(), 32, 50_000_000)
    assert out.shape == (32, 32, 3) and out[..., 0].min() > 250 and out[..., 2].max() < 5


def test_an_mpo_photo_is_decoded_at_a_reduced_scale_like_a_jpeg():
    """The JPEGs many cameras and phones write (Pillow: MPO) get the reduced-DCT decoding JPEGs get."""
    photo = Image.effect_noise((4000, 3000), 64).convert("RGB")
    jpg, mpo = io.BytesIO(), io.BytesIO()
    photo.save(jpg, format="JPEG")
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.resize((400, 300))])
    assert Image.open(mpo).format == "MPO"
    assert np.array_equal(eval_transform(mpo.getvalue(), 48), eval_transform(jpg.getvalue(), 48))


def test_the_device_decoding_path_gives_the_cpu_paths_images_and_errors():
    """decode_on_device (nvJPEG on a GPU replica; torchvision's CPU decoder here) against the CPU path: the
    same crops within resampling noise, and a JPEG that cannot be decoded is the same 400 on both."""
    from pipelines.data.sample import draw_sample

    jpegs = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (64, 48)]):
        buf = io.BytesIO()
        draw_sample(i, 4, w, h, np.random.default_rng(i)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    broken = jpegs[0][:300]
    out = images.decode_batch_on_device([*jpegs, broken], 48, torch.device("cpu"), 50_000_000)
    for data, got in zip(jpegs, out):
        want = images.decode(data, 48, 50_000_000)
        assert got.shape == want.shape and got.dtype == torch.uint8
        assert np.abs(got.numpy().astype(int) - want.astype(int)).mean() < 2
    assert isinstance(out[-1], ClientError) and out[-1].status == 400 and "cannot be decoded" in str(out[-1])
