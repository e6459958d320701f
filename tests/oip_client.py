#!/usr/bin/env python3
"""Classify images through the server's Open Inference Protocol (KServe v2 REST)
endpoint with a third-party client library, as a user would.

Why this exists: users already have Triton's ``tritonclient[http]`` or KServe's
``kserve`` SDK installed in their own environment, and those libraries cannot
share the project's venv (kserve pins pandas<3, protobuf<7, psutil<6). This
script is deliberately standalone (stdlib + numpy + the client library, PIL
optional, nothing from the project, no pytest) so it can run in such a venv
and prove the server speaks the protocol those clients expect, in JSON and in
the binary tensor data extension.

    python tests/oip_client.py {triton|kserve} --url http://127.0.0.1:PORT \\
        --model NAME [--version V] [--top-k K] [--binary] [--pixels] FILE...

Input ``images``: by default BYTES [N], each element one file's raw bytes
(JPEG/PNG/WebP).  With --pixels: UINT8 [N,H,W,3]; ``.npy`` files are loaded
with numpy (uint8 [H,W,3], or [n,H,W,3] concatenated along the batch), any
other file is decoded to RGB with PIL, which then must be importable. All
images must share H and W (one tensor); nothing is resized.
--binary sends the input and asks for both outputs in the binary tensor data
extension; without it everything is JSON. Note: neither client can send
non-UTF-8 BYTES (i.e. real image files) as JSON: they refuse before sending.

Prints ONE JSON object: {"server", "model", "live", "ready", "probabilities",
"classes"}; "ready" is server-ready AND model-ready. On any failure it prints
the client's error to stderr and exits 1.
"""

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request

import numpy as np

INPUT, PROBS, CLASSES = "images", "probabilities", "classes"


def load_tensor(files, pixels):
    """Return (numpy array, OIP datatype) for the `images` input."""
    if not pixels:
        arr = np.empty(len(files), dtype=np.object_)  # object array: bytes kept as-is
        for i, f in enumerate(files):
            with open(f, "rb") as fh:
                arr[i] = fh.read()
        return arr, "BYTES"
    frames = []
    for f in files:
        if f.endswith(".npy"):
            a = np.load(f)
            frames.extend(a if a.ndim == 4 else [a])
        else:
            from PIL import Image  # only needed for --pixels with image files

            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
    shapes = {a.shape for a in frames}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"--pixels needs images of one H,W,3 shape; got {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(frames), dtype=np.uint8), "UINT8"


def as_strings(arr):
    return [[c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in row] for row in arr]


def run_triton(args, data, datatype):
    import tritonclient.http as httpclient

    url = args.url.split("://", 1)[-1]  # tritonclient wants host:port[/prefix], no scheme
    client = httpclient.InferenceServerClient(url, ssl=args.url.startswith("https://"))
    try:
        version = args.version or ""
        server = client.get_server_metadata()
        model = client.get_model_metadata(args.model, version)
        live = client.is_server_live()
        ready = client.is_server_ready() and client.is_model_ready(args.model, version)
        inp = httpclient.InferInput(INPUT, list(data.shape), datatype)
        inp.set_data_from_numpy(data, binary_data=args.binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=args.binary) for n in (PROBS, CLASSES)]
        result = client.infer(
            args.model, [inp], model_version=version, outputs=outputs, parameters={"top_k": args.top_k}
        )
        probs, classes = result.as_numpy(PROBS), result.as_numpy(CLASSES)
    finally:
        client.close()
    return server, model, live, ready, probs, classes


def http_get_json(url):
    # kserve's REST client (0.21) has no server/model metadata calls: plain GET.
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"GET {url}: {e.code} {e.read().decode(errors='replace')}") from e


async def run_kserve(args, data, datatype):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    base = args.url.rstrip("/")
    # kserve builds f"v2/models/{model_name}/infer" and ignores InferRequest.model_version,
    # so a version is addressed by putting it in the path segment.
    path_name = f"{args.model}/versions/{args.version}" if args.version else args.model
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        live = await client.is_server_live(base)
        ready = await client.is_server_ready(base) and await client.is_model_ready(base, path_name)
        server = http_get_json(f"{base}/v2")
        model = http_get_json(f"{base}/v2/models/{path_name}")
        inp = InferInput(INPUT, list(data.shape), datatype)
        inp.set_data_from_numpy(data, binary_data=args.binary)
        request = InferRequest(
            model_name=args.model,
            infer_inputs=[inp],
            parameters={"top_k": args.top_k},
            request_outputs=[RequestedOutput(n, {"binary_data": args.binary}) for n in (PROBS, CLASSES)],
        )
        response = await client.infer(base, request, model_name=path_name)
    finally:
        await client.close()
    out = {o.name: o.as_numpy() for o in response.outputs}
    return server, model, live, ready, out[PROBS], out[CLASSES]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("client", choices=["triton", "kserve"])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--version", help='registry version number, e.g. "2"')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--binary", action="store_true", help="binary tensor data extension")
    p.add_argument("--pixels", action="store_true", help="send UINT8 [N,H,W,3]")
    p.add_argument("files", nargs="+", metavar="IMAGE_FILE")
    args = p.parse_args(argv)
    try:
        data, datatype = load_tensor(args.files, args.pixels)
        if args.client == "triton":
            res = run_triton(args, data, datatype)
        else:
            res = asyncio.run(run_kserve(args, data, datatype))
    except Exception as e:  # the client's own exception, reported as-is
        msg = str(e)
        msg = msg if len(msg) < 300 else msg[:300] + "... [truncated]"
        print(f"{type(e).__module__}.{type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    server, model, live, ready, probs, classes = res
    print(
        json.dumps(
            {
                "server": server,
                "model": model,
                "live": bool(live),
                "ready": bool(ready),
                "probabilities": np.asarray(probs, dtype=np.float32).tolist(),
                "classes": as_strings(np.asarray(classes, dtype=object)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
