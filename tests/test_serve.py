"""The Serve application over real HTTP, deployed from infra/serve.yaml on the session's Ray cluster, serving
versions from a registry on the loopback S3 endpoint: answers, batching, hostile input, hot reload under
traffic, a corrupt version, auth, autoscaling, a killed replica, and `serve deploy` as users run it."""

import base64
import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import requests
import torch
import yaml
from helpers import RAY_CLI, jpeg, png_header, serve_test_config, traffic, until, write_run
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema
from ray.util.state import list_actors

from pipelines import storage
from pipelines.cluster import HEAD, SERVE_ENV, Capacity, NodeType, ResourcePlanError
from pipelines.label.job import LabelConfig, label, read_labels
from pipelines.local_s3 import free_port
from pipelines.preprocess import eval_transform, normalize
from pipelines.registry.promote import promote
from pipelines.registry.store import Registry
from pipelines.serve.deploy import deploy, deployment_options, load_serve_config, plan_serving_resources

CLASSES = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]
ADMIN_TOKEN = "adm1n-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = "s3://serve-test/registry"
POLL_S = 1.0


def test_the_serve_configs_pass_serves_schema_and_differ_only_in_resources_and_decoding():
    cpu, gpu = (yaml.safe_load(Path(f"infra/{name}.yaml").read_text()) for name in ("serve", "serve-gpu"))
    for config in (cpu, gpu):
        ServeDeploySchema.model_validate(config)
    assert deployment_options(gpu)["ray_actor_options"]["num_gpus"] == 1
    assert [c["applications"][0]["args"]["decode_on_device"] for c in (cpu, gpu)] == [False, True]
    for config in (cpu, gpu):
        config["applications"][0]["deployments"][0].pop("ray_actor_options")
        config["applications"][0]["args"].pop("decode_on_device")
    assert cpu == gpu


def test_serves_fast_path_is_started_as_documented():
    """The variables that local clusters get (pipelines.cluster.SERVE_ENV, which the session cluster here
    starts with too) are the ones the README and both Serve configs tell cluster users to set."""
    line = " ".join(f"{k}={v}" for k, v in SERVE_ENV.items())
    for doc in ("README.md", "infra/serve.yaml", "infra/serve-gpu.yaml"):
        assert f"{line} ray start" in Path(doc).read_text(), doc


def test_replicas_that_cannot_be_placed_are_an_error_before_deploying():
    """A fixed cluster: one replica must fit one node, and the replicas started at once what is free."""
    gpu = deployment_options(load_serve_config("infra/serve-gpu.yaml"))  # a replica: 8 CPUs and 1 GPU
    cpu = deployment_options(load_serve_config("infra/serve.yaml"))  # 1 CPU
    with pytest.raises(ResourcePlanError, match=r"a replica needs 8 CPU and 1 GPU on one node, and no node has"):
        plan_serving_resources(gpu, Capacity(({"CPU": 4.0},) * 4), {"CPU": 16.0})  # 16 CPUs, none on one node
    with pytest.raises(ResourcePlanError, match=r"1 replica\(s\) x 8 CPU = 8 CPU, but the cluster has 2 free"):
        plan_serving_resources(gpu, Capacity(({"CPU": 16.0, "GPU": 1.0},)), {"CPU": 2.0, "GPU": 1.0})
    plan_serving_resources(gpu, Capacity(({"CPU": 16.0, "GPU": 1.0},)), {"CPU": 16.0, "GPU": 1.0})
    plan_serving_resources(cpu, Capacity(({"CPU": 2.0},)), {"CPU": 1.0})
    with pytest.raises(
        ResourcePlanError,
        match=r"needs 1 CPU on one node.*publish its node types first: python -m jobs.cluster report-node-types",
    ):
        plan_serving_resources(cpu, Capacity(({"CPU": 0.0, HEAD: 1.0},)), {"CPU": 0.0})  # types unpublished


def test_on_a_cluster_that_autoscales_replicas_are_planned_for_the_node_types_it_may_add():
    """A head with 0 CPUs and nothing free (infra/aws/cluster.yaml's shape): a replica must fit a node type, and
    the replicas started at once what the cluster can become."""
    gpu = deployment_options(load_serve_config("infra/serve-gpu.yaml"))
    cpu = deployment_options(load_serve_config("infra/serve.yaml"))
    head = ({"CPU": 0.0, HEAD: 1.0},)
    cpu_nodes, gpu_node = NodeType("cpu", {"CPU": 4.0}, 2), NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 1)
    plan_serving_resources(cpu, Capacity(head, (cpu_nodes,)), {"CPU": 0.0})
    with pytest.raises(
        ResourcePlanError, match=r"1 GPU on one node, .* nor any node type .* \(the largest: 4 CPU, 0 GPU\)"
    ):
        plan_serving_resources(gpu, Capacity(head, (cpu_nodes,)), {})
    plan_serving_resources(gpu, Capacity(head, (cpu_nodes, gpu_node)), {})
    two = _starting(gpu, 2)
    with pytest.raises(ResourcePlanError, match=r"2 replica\(s\) of 8 CPU and 1 GPU each .* can hold 1 at most"):
        plan_serving_resources(two, Capacity(head, (cpu_nodes, gpu_node)), {})
    plan_serving_resources(two, Capacity(head, (cpu_nodes, dataclasses.replace(gpu_node, max_count=2))), {})
    plan_serving_resources(two, Capacity(head, (NodeType("gpu2", {"CPU": 16.0, "GPU": 2.0}, 1),)), {})
    # Packed node by node: 3 CPUs each on nodes of 4 is one replica a node, though 4 x 3 CPUs <= 4 nodes x 4 CPUs.
    three_cpus = {**cpu, "ray_actor_options": {"num_cpus": 3}}
    plan_serving_resources(_starting(three_cpus, 4), Capacity(head, (NodeType("cpu", {"CPU": 4.0}, 4),)), {})
    with pytest.raises(ResourcePlanError, match=r"can hold 3 at most"):
        plan_serving_resources(_starting(three_cpus, 4), Capacity(head, (NodeType("cpu", {"CPU": 4.0}, 3),)), {})
    # Custom resources count (a replica that asks for an accelerator of its own goes to nodes that have one), and
    # nodes that are up already count once.
    accelerated = {**cpu, "ray_actor_options": {"num_cpus": 1, "resources": {"accelerator": 1}}}
    with pytest.raises(ResourcePlanError, match=r"1 CPU and 1 accelerator on one node"):
        plan_serving_resources(accelerated, Capacity(head, (cpu_nodes,)), {})
    on_accelerators = Capacity(
        (*head, {"CPU": 1.0, "accelerator": 1.0}), (NodeType("acc", {"CPU": 1, "accelerator": 1}, 2),)
    )
    plan_serving_resources(_starting(accelerated, 2), on_accelerators, {})
    with pytest.raises(ResourcePlanError, match=r"can hold 2 at most"):
        plan_serving_resources(_starting(accelerated, 3), on_accelerators, {})


def _starting(options: dict, n: int) -> dict:
    """``options`` whose deployment starts ``n`` replicas at once."""
    return {**options, "autoscaling_config": {**options["autoscaling_config"], "min_replicas": n}}


@pytest.fixture(scope="module")
def app(ray_cluster, s3_endpoint, tmp_path_factory):
    """Version 1 promoted and served, deployed with the `serve` CLI as users deploy infra/serve.yaml, against
    the session cluster's dashboard: the file with the test's timings and limits (serve_test_config), the
    registry and model filled in, loopback and the test's port. Runs b and c ready to promote. Other
    applications use ``deploy``, as jobs.serve does."""
    storage.ensure_bucket(ROOT)
    for name, seed in (("a", 0), ("b", 100), ("c", 200)):
        write_run(f"s3://serve-test/runs/{name}", [50.0 + seed / 10], CLASSES, seed=seed)
    promote("s3://serve-test/runs/a", ROOT, "tiny")
    port = free_port()
    config = serve_test_config()
    config["http_options"].update(host="127.0.0.1", port=port)
    admin = tmp_path_factory.mktemp("admin") / "token"
    admin.write_text(ADMIN_TOKEN + "\n")
    settings = {"registry": ROOT, "model": "tiny", "poll_interval_s": POLL_S, "max_body_bytes": 2_000_000,
                "admin_token_file": str(admin)}  # fmt: skip
    config["applications"][0]["args"].update(settings)
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(RAY_CLI).with_name("serve"))
    subprocess.run([serve_cli, "deploy", str(path), "-a", ray_cluster["dashboard"]], check=True, timeout=120)
    until(lambda: _app_status("crossvit") == "RUNNING", timeout=180)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "registry": Registry(ROOT), "admin_token_file": str(admin)}
    serve.shutdown()


def _app_status(name: str) -> str | None:
    application = serve.status().applications.get(name)
    return application and application.status


def classify(url: str, data: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/v1/classify", data=data, params=params, timeout=60)


def test_answers_equal_direct_inference(app):
    reg = app["registry"]
    model = reg.load(reg.resolve("tiny", "production"))
    for i in range(3):
        data = jpeg(i)
        answer = classify(app["url"], data, top_k=4).json()
        x = normalize(torch.from_numpy(eval_transform(data, 48)[None]), channels_last=False)
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0].numpy()
        assert answer["labels"][0] == int(probs.argmax()) and answer["version"] == 1 and answer["model"] == "tiny"
        assert np.allclose(answer["probs"], probs[answer["labels"]], atol=1e-4)
        assert answer["names"] == [f"class {k}" for k in answer["labels"]]
    assert len(classify(app["url"], jpeg(0)).json()["labels"]) == 4  # top_k 5 by default, at most the classes


def test_batch_labels_equal_the_endpoints_answers(app, tmp_path):
    """The same images through the online endpoint and through the batch labeling job: the same version,
    classes and probabilities (one evaluation transform and one checkpoint format for both)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(jpeg(i))
    label(LabelConfig(str(images), str(tmp_path / "labels"), ROOT, "tiny", top_k=3))
    batch = {Path(r["path"]).name: r for r in read_labels(str(tmp_path / "labels")).to_pylist()}
    assert len(batch) == 4
    for i in range(4):
        online, row = classify(app["url"], jpeg(i), top_k=3).json(), batch[f"{i}.jpg"]
        assert row["labels"] == online["labels"] and row["names"] == online["names"]
        assert (row["model"], row["version"]) == (online["model"], online["version"]) == ("tiny", 1)
        assert np.allclose(row["probs"], online["probs"], atol=1e-4)


KSERVE = "kserve==0.21.0"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kserve_python() -> str:
    """KServe's Python SDK in a virtual environment of its own (it pins pandas<3, protobuf<7 and psutil<6,
    older than Ray's environment has): made once in .venv-kserve/ and kept (45-100 s to make)."""
    venv = REPO / ".venv-kserve"
    marker = venv / f"{KSERVE}.installed"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", KSERVE, "numpy", "pillow"]
        subprocess.run(pip, check=True, timeout=600)
        marker.touch()
    return str(venv / "bin" / "python")


def oip_client(python: str, kind: str, url: str, files: list[Path], *args: str) -> subprocess.CompletedProcess:
    """tests/oip_client.py: the client library a Triton or KServe user has, as that user calls it."""
    command = [python, str(REPO / "tests" / "oip_client.py"), kind, "--url", url, "--model", "tiny", "--top-k", "3"]
    return subprocess.run([*command, *args, *map(str, files)], capture_output=True, text=True, timeout=180)


def test_triton_and_kserve_clients_get_the_answers_of_v1(app, tmp_path, kserve_python):
    """The Open Inference Protocol through the clients no one here wrote (tritonclient[http], KServe's SDK):
    images as BYTES in the binary extension, and as UINT8 pixels (JSON and binary), answer what /v1/classify
    answers for the same JPEGs (and for PNGs of the same pixels: a PNG decodes to exactly them); a version
    that is not served is a 404 naming the one that is."""
    url, jpegs, npys, pngs = app["url"], [], [], []
    for i in range(3):
        jpegs.append(tmp_path / f"{i}.jpg")
        jpegs[-1].write_bytes(jpeg(i))
        pixels = np.asarray(Image.open(io.BytesIO(jpeg(i, 160, 120))).convert("RGB"))  # small: JSON arrays
        npys.append(tmp_path / f"{i}.npy")
        np.save(npys[-1], pixels)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    by_jpeg = [classify(url, jpeg(i), top_k=3).json() for i in range(3)]
    by_png = [classify(url, png, top_k=3).json() for png in pngs]
    runs = [
        (sys.executable, "triton", jpegs, ["--binary", "--version", "1"], by_jpeg),
        (sys.executable, "triton", npys, ["--pixels"], by_png),
        (sys.executable, "triton", npys, ["--pixels", "--binary"], by_png),
        (kserve_python, "kserve", jpegs, ["--binary"], by_jpeg),
        (kserve_python, "kserve", npys, ["--pixels", "--binary"], by_png),
    ]
    for python, kind, files, args, want in runs:
        run = oip_client(python, kind, url, files, *args)
        assert run.returncode == 0, (kind, args, run.stderr)
        got = json.loads(run.stdout)
        assert got["live"] and got["ready"] and got["model"]["versions"] == ["1"], (kind, got)
        for probs, classes, answer in zip(got["probabilities"], got["classes"], want):
            assert classes == answer["names"], (kind, args)
            assert np.allclose([probs[k] for k in answer["labels"]], answer["probs"], atol=1e-5), (kind, args)
    missing = oip_client(sys.executable, "triton", url, jpegs[:1], "--binary", "--version", "7")
    assert missing.returncode == 1 and "404" in missing.stderr and "served: [1]" in missing.stderr
    # JSON with the images base64-encoded (KServe's examples send them so); a broken image is a 400 naming it.
    spec = {"name": "images", "datatype": "BYTES", "shape": [2],
            "data": [base64.b64encode(jpeg(0)).decode(), base64.b64encode(b"no image").decode()]}  # fmt: skip
    bad = requests.post(f"{url}/v2/models/tiny/infer", json={"inputs": [spec]}, timeout=60)
    assert bad.status_code == 400 and "image 1: the body is not an image" in bad.json()["error"]
    spec.update(shape=[1], data=spec["data"][:1])
    good = requests.post(f"{url}/v2/models/tiny/infer", json={"inputs": [spec], "parameters": {"top_k": 3}}, timeout=60)
    (_, classes) = good.json()["outputs"]
    assert good.json()["model_name"] == "tiny" and classes["data"] == by_jpeg[0]["names"]


def test_multipart_uploads_and_the_batch_route_answer_each_image_on_its_own(app):
    one = requests.post(f"{app['url']}/v1/classify", files={"image": ("a.jpg", jpeg(0), "image/jpeg")}, timeout=60)
    assert one.status_code == 200 and one.json()["labels"] == classify(app["url"], jpeg(0)).json()["labels"]
    files = [("image", ("a.jpg", jpeg(1))), ("image", ("b.txt", b"no image")), ("image", ("c.jpg", jpeg(2)))]
    results = requests.post(f"{app['url']}/v1/classify/batch", files=files, timeout=60).json()["results"]
    assert [("error" in r) for r in results] == [False, True, False] and results[1]["status"] == 400
    mpo = io.BytesIO()  # the JPEG flavour many cameras and phones write: the photo and a second picture
    photo = Image.open(io.BytesIO(jpeg(1)))
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.resize((160, 120))])
    assert Image.open(mpo).format == "MPO" and classify(app["url"], mpo.getvalue()).status_code == 200
    assert results[2]["labels"] == classify(app["url"], jpeg(2)).json()["labels"]  # in order
    too_many = [("image", (f"{i}.jpg", jpeg(0))) for i in range(17)]
    response = requests.post(f"{app['url']}/v1/classify/batch", files=too_many, timeout=60)
    assert response.status_code == 400 and "error" in response.json()


def test_concurrent_requests_are_batched(app):
    data = jpeg(3, 64, 48)  # decoded in a fraction of a model call: the requests queue behind the model
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: classify(app["url"], data).json(), range(64)))
    batches = [a["batch"] for a in answers]
    # What queued while the model ran is one batch (up to 16); @serve.batch's were 2 (pipelines/serve/batching.py).
    assert max(batches) >= 12 and sum(b >= 8 for b in batches) >= len(batches) / 4, sorted(batches)
    assert len({tuple(a["labels"]) for a in answers}) == 1


BAD_INPUTS = [
    ("empty body", b"", {}, 400, "empty body"),
    ("not an image", b"hello, world", {}, 400, "not an image"),
    ("JSON", b'{"image": "cat.jpg"}', {"Content-Type": "application/json"}, 400, "not an image"),
    ("truncated JPEG", jpeg(0)[:2000], {}, 400, "cannot be decoded"),
    ("GIF", None, {}, 415, "GIF images are not accepted"),
    # 60 MP: below Pillow's own bomb limits (89 MP warns, 179 MP refuses), so only the app's check refuses it
    ("decompression bomb", png_header(8000, 7500), {}, 413, "more than the 50,000,000 allowed"),
    ("body over the limit", b"\xff" * 2_000_001, {}, 413, "over the 2,000,000"),
    ("multipart without an image field", None, {}, 400, "no 'image' field"),
]


@pytest.mark.parametrize("name,body,headers,status,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_with_a_json_error_and_the_replica_stays_healthy(app, name, body, headers, status, message):
    url = app["url"]
    if name == "GIF":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="GIF")
        response = classify(url, buf.getvalue())
    elif name == "multipart without an image field":
        response = requests.post(f"{url}/v1/classify", files={"picture": ("a.jpg", jpeg(0))}, timeout=60)
    else:
        response = requests.post(f"{url}/v1/classify", data=body, headers=headers, timeout=60)
    assert response.status_code == status and message in response.json()["error"]
    assert classify(url, jpeg(0)).status_code == 200 and requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(app):
    def chunks():
        for _ in range(40):
            yield b"\xff" * 100_000  # 4 MB in all, with no Content-Length

    response = requests.post(f"{app['url']}/v1/classify", data=chunks(), timeout=60)
    assert response.status_code == 413 and "over the 2,000,000 bytes" in response.json()["error"]


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_body_over_the_limit_is_answered_before_it_ends(app, declared):
    """A client that sends 2.5 MB chunked and then nothing more (the body never ends), or only headers that
    declare 2.5 GB, gets its 413 at once: the limit is applied to the declared length and while the body
    streams in, not after a whole body was read."""
    chunk = b"\xff" * 100_000
    with socket.create_connection(("127.0.0.1", app["port"]), timeout=15) as s:
        if declared:
            # Only the headers: the limit is applied to the declared length before any byte of the body
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 2500000000\r\n\r\n")
        else:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(25):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def test_uploads_over_the_limit_cost_the_replica_and_the_ingress_little_memory(app):
    """64 uploads of 12 MB at once (over the 2 MB limit; half declared, half chunked): the replica's and the
    ingress's (HAProxy, Serve's proxy) peak RSS rises by less than 100 MB, where keeping the bodies would
    cost up to 768 MB; every upload is refused (413, or 503 beyond the queue), and the app serves on."""
    replicas = [a.pid for a in _replicas()]
    ingress = [p.pid for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "haproxy"
               or "ProxyActor" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    assert replicas and ingress
    before = {"replica": _rss(replicas), "ingress": _rss(ingress)}
    peak = dict(before)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["replica"] = max(peak["replica"], _rss(replicas))
            peak["ingress"] = max(peak["ingress"], _rss(ingress))
            time.sleep(0.02)

    body = b"\xff" * 12_000_000

    def upload(i: int) -> int:
        data = body if i % 2 else iter([body[j : j + 1_000_000] for j in range(0, len(body), 1_000_000)])
        try:
            return requests.post(f"{app['url']}/v1/classify", data=data, timeout=120).status_code
        except requests.ConnectionError:  # refused and closed while it still sent: also not kept
            return 413

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(upload, range(64)))
    finally:
        stop.set()
        watcher.join()
    rise = {k: (peak[k] - before[k]) / 2**20 for k in before}
    assert set(statuses) <= {413, 503} and 413 in statuses, statuses
    assert rise["replica"] < 100 and rise["ingress"] < 100, rise
    assert classify(app["url"], jpeg(0)).status_code == 200


@pytest.mark.parametrize("top_k,status", [(0, 400), (5, 400), ("two", 422), (-1, 400)])
def test_a_bad_top_k_is_refused(app, top_k, status):
    response = classify(app["url"], jpeg(0), top_k=top_k)
    assert response.status_code == status and "top_k" in response.json()["error"]


def test_a_promotion_and_a_rollback_under_traffic_fail_no_request(app):
    with traffic(app["url"], 4) as (seen, failures):
        promote("s3://serve-test/runs/b", ROOT, "tiny")  # version 2
        took = until(lambda: seen and seen[-1] == 2, timeout=POLL_S + 20)
        app["registry"].rollback("tiny", "production")
        until(lambda: seen[-1] == 1 and seen[-2] == 1, timeout=POLL_S + 20)
    assert failures == [] and 2 in seen and len(seen) > 20
    assert took < POLL_S + 10  # the poll interval plus loading and checking the new version


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(app, tmp_path):
    reg = app["registry"]
    served = classify(app["url"], jpeg(0)).json()["version"]
    source = reg.get("tiny", 1)
    local = tmp_path / "weights.safetensors"
    local.write_bytes(storage.read_bytes(source.weights_uri))
    bad = reg.register("tiny", local, source.meta)
    data = bytearray(storage.read_bytes(bad.weights_uri))
    data[-4:] = b"\x00\x00\x80\x7f"  # a NaN in the last tensor: a valid file, the wrong bytes
    storage.write_bytes(bad.weights_uri, bytes(data))
    expected = reg.read_alias("tiny", "production")
    reg.move_alias("tiny", "production", bad.number, expected=expected, why="test: a damaged upload")
    try:
        reloaded = requests.post(f"{app['url']}/v1/admin/reload", headers=ADMIN, timeout=120).json()
        assert reloaded["version"] == served and "sha256" in reloaded["load_error"]

        def refused() -> bool:  # every replica, at its next poll (the reload reached one of them)
            status = requests.get(f"{app['url']}/v1/admin/status", headers=ADMIN, timeout=10).json()
            return status["version"] == served and f"versions/{bad.number}/weights" in (status["load_error"] or "")

        until(refused, timeout=POLL_S + 20)
        assert classify(app["url"], jpeg(0)).json()["version"] == served
        # A replica that starts now (autoscaling, a replacement) starts with the last version that loads.
        config = serve_test_config()
        config["applications"][0].update(name="crossvit-late", route_prefix="/late")
        late = deploy(config, {"registry": ROOT, "model": "tiny", "admin_token_file": app["admin_token_file"]},
                      port=app["port"])  # fmt: skip
        status = requests.get(f"{late}/v1/admin/status", headers=ADMIN, timeout=10).json()
        assert (
            status["version"] == served and status["refused_version"] == bad.number and "sha256" in status["load_error"]
        )
        serve.delete("crossvit-late")
    finally:
        reg.rollback("tiny", "production")
        requests.post(f"{app['url']}/v1/admin/reload", headers=ADMIN, timeout=120)


TOKEN = {"Authorization": "Bearer s3cr3t-token"}


@pytest.fixture(scope="module")
def guarded_registry(app, tmp_path_factory) -> str:
    """A registry of the guarded application's own, on a local path: run a's version 1."""
    registry = str(tmp_path_factory.mktemp("guarded") / "registry")
    promote("s3://serve-test/runs/a", registry, "tiny")
    return registry


@pytest.fixture(scope="module")
def guarded(app, guarded_registry, tmp_path_factory):
    """A second application beside the first, with what the first lacks: a bearer token from a file (a
    mounted secret), a queue of one (one replica, max_ongoing_requests 1, max_queued_requests 1), JPEGs
    decoded on the model's device (the GPU replicas' path; torchvision's CPU decoder here), and a registry
    of its own, which a test takes away and gives back."""
    secret = tmp_path_factory.mktemp("secret") / "token"
    secret.write_text("s3cr3t-token\n")
    config = serve_test_config()
    config["applications"][0].update(name="crossvit-guarded", route_prefix="/guarded")
    (options,) = config["applications"][0]["deployments"]
    options.update(max_ongoing_requests=1, max_queued_requests=1)
    options["autoscaling_config"].update(max_replicas=1)
    settings = {"registry": guarded_registry, "model": "tiny", "auth_token_file": str(secret), "decode_on_device": True,
                "poll_interval_s": POLL_S}  # fmt: skip
    yield deploy(config, settings, port=app["port"])
    serve.delete("crossvit-guarded")


def test_gpu_replicas_decoding_path_answers_as_the_cpu_path(app, guarded):
    """decode_on_device (a batch's JPEGs decoded with the model, nvJPEG on a GPU) against the CPU path of the
    same version: the same top-1 and probabilities within resampling noise; PNGs take the CPU path there too;
    a broken JPEG is the same 400."""
    gaps = []
    for i in range(3):
        on_device = requests.post(f"{guarded}/v1/classify", data=jpeg(i), headers=TOKEN, timeout=60).json()
        on_cpu = classify(app["url"], jpeg(i)).json()
        assert on_device["version"] == on_cpu["version"] == 1 and on_device["labels"][0] == on_cpu["labels"][0]
        assert np.allclose(on_device["probs"], on_cpu["probs"], atol=0.02), (on_device, on_cpu)
        gaps.append(np.abs(np.subtract(on_device["probs"], on_cpu["probs"])).max())
    assert max(gaps) > 1e-6  # the device path did run: torchvision's resampling is not bit-equal to Pillow's
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg(0))).save(png, format="PNG")
    assert requests.post(f"{guarded}/v1/classify", data=png.getvalue(), headers=TOKEN, timeout=60).status_code == 200
    broken = requests.post(f"{guarded}/v1/classify", data=jpeg(0)[:3000], headers=TOKEN, timeout=60)
    assert broken.status_code == 400 and "cannot be decoded" in broken.json()["error"]


def test_a_registry_that_cannot_be_read_makes_the_replica_unready_not_dead(guarded, guarded_registry):
    """The alias disappears (storage unreadable, a prefix deleted): within a poll the replica says so in
    /healthz ("degraded") and in OIP readiness (503), keeps answering with the version it holds, and is
    ready again once the registry is back."""
    aliases = Path(guarded_registry) / "tiny" / "aliases"
    moved = aliases.with_name("aliases-away")
    aliases.rename(moved)
    try:
        until(lambda: requests.get(f"{guarded}/v2/health/ready", timeout=10).status_code == 503, timeout=POLL_S + 20)
        assert requests.get(f"{guarded}/healthz", timeout=10).json()["status"] == "degraded"
        assert requests.post(f"{guarded}/v1/classify", data=jpeg(0), headers=TOKEN, timeout=60).json()["version"] == 1
    finally:
        moved.rename(aliases)
    until(lambda: requests.get(f"{guarded}/v2/health/ready", timeout=10).status_code == 200, timeout=POLL_S + 20)
    assert requests.get(f"{guarded}/healthz", timeout=10).json()["status"] == "ok"


CLASSIFY_ROUTES = [
    ("post", "/v1/classify"), ("post", "/v1/classify/batch"), ("get", "/v1/models"), ("get", "/v2/models/tiny"),
    ("get", "/v2/models/tiny/ready"), ("post", "/v2/models/tiny/infer"),
]  # fmt: skip
ADMIN_ROUTES = [("get", "/v1/admin/status"), ("post", "/v1/admin/reload")]
PUBLIC_ROUTES = ["/healthz", "/v2", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"]


def test_every_route_asks_for_its_own_token(app, guarded):
    """Classification routes need the classification token where one is configured (``guarded``) and none
    where it is not (``app``); administration needs the admin token, which the classification token is not,
    and is off (403) where none is configured; health, server metadata and the docs are public. Neither
    application shows a storage URI to a client."""
    for method, route in CLASSIFY_ROUTES:
        anonymous = requests.request(method, guarded + route, timeout=60)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer", route
        assert requests.request(method, guarded + route, headers=ADMIN, timeout=60).status_code == 401, route
        for url, headers in ((guarded, TOKEN), (app["url"], {})):
            answered = requests.request(method, url + route, headers=headers, timeout=60)
            assert answered.status_code not in (401, 403) and "s3://" not in answered.text, (route, answered.text)
    for method, route in ADMIN_ROUTES:
        for headers in ({}, TOKEN, ADMIN):
            off = requests.request(method, guarded + route, headers=headers, timeout=60)
            assert off.status_code == 403 and "administration is off" in off.json()["error"], route
        for headers in ({}, TOKEN):
            assert requests.request(method, app["url"] + route, headers=headers, timeout=60).status_code == 401, route
        assert requests.request(method, app["url"] + route, headers=ADMIN, timeout=120).status_code == 200, route
    for route in PUBLIC_ROUTES:
        assert requests.get(guarded + route, timeout=60).status_code == 200, route
    documented = requests.get(f"{guarded}/openapi.json", timeout=60).json()["paths"]
    assert {"/v1/classify", "/v1/classify/batch", "/v2/models/{name}/infer"} <= set(documented)
    assert not [p for p in documented if "admin" in p]
    assert requests.post(f"{guarded}/v1/classify", data=jpeg(0), headers=TOKEN, timeout=60).json()["version"] == 1


def test_an_overloaded_deployment_answers_503_with_retry_after_at_once(guarded):
    """Requests beyond what a queue of one holds are refused quickly with Retry-After (Serve's
    max_queued_requests), not left to time out."""
    slow = slow_png(3000)  # about 0.15 s to decode, so requests pile up

    def timed(_) -> tuple[float, requests.Response, float]:
        start = time.monotonic()
        response = requests.post(f"{guarded}/v1/classify", data=slow, headers=TOKEN, timeout=60)
        return start, response, time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(timed, range(8)))
    refused = [(r, end - start) for start, r, end in answers if r.status_code == 503]
    assert refused and any(r.status_code == 200 for _, r, _ in answers)
    assert all(r.headers["Retry-After"] == "1" and took < 2 for r, took in refused)


def slow_png(side: int) -> bytes:
    """A side x side PNG of a gradient: small to send (60 KB at 3000), slow to decode (0.15 s at 3000)."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([np.add.outer(ramp, ramp) // 2] * 3, -1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _logged(*wanted: str, timeout: float = 10) -> None:
    """Every ``wanted`` text is in one line of the session cluster's replica logs, ending in " ms"."""
    logs = Path(os.environ["RAY_TMPDIR"])  # the session cluster's folder (conftest)

    def found() -> bool:
        lines = [line for f in logs.rglob("replica_crossvit_Classifier_*.log") for line in f.open()]
        return all(any(w in line and line.rstrip().endswith(" ms") for line in lines) for w in wanted)

    until(found, timeout=timeout)


def test_a_request_whose_client_goes_away_is_counted_and_logged_as_cancelled(app):
    """The client sends a slow image (a 6000 x 6000 PNG) and hangs up before the answer: the replica's
    handler is cancelled, and its line says so (499, Serve's and nginx's code for it)."""
    body, rid = slow_png(6000), f"gone-{time.time_ns()}"
    version = classify(app["url"], jpeg(0)).json()["version"]
    head = f"POST /v1/classify HTTP/1.1\r\nHost: t\r\nX-Request-ID: {rid}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", app["port"]), timeout=15) as s:
        s.sendall(head.encode() + body)
        time.sleep(0.3)  # the request reached the replica (decoding takes about 0.6 s); nobody waits for it
    _logged(f"classify cancelled 499 version={version} request_id={rid} ")


def test_every_request_is_logged_with_its_request_id_version_outcome_and_latency(app):
    """The line of this very request (its X-Request-ID, sent by the client and answered back), not any line."""
    rid = f"test-{time.time_ns()}"
    answer = requests.post(f"{app['url']}/v1/classify", data=jpeg(0), headers={"X-Request-ID": rid}, timeout=60)
    assert answer.headers["X-Request-ID"] == rid
    bad = requests.post(
        f"{app['url']}/v1/classify", data=b"no image", headers={"X-Request-ID": rid + "-bad"}, timeout=60
    )
    assert bad.status_code == 400
    version = answer.json()["version"]
    _logged(
        f"classify ok 200 version={version} request_id={rid} ",
        f"classify client_error_400 400 version={version} request_id={rid}-bad ",
    )


def _replicas() -> list:
    return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "crossvit:Classifier" in a.class_name]


def test_a_load_burst_adds_a_replica_and_it_goes_away_afterwards(app):
    with traffic(app["url"], 12) as (_, failures):
        until(lambda: len(_replicas()) >= 2, timeout=60)
    until(lambda: len(_replicas()) == 1, timeout=60)
    assert failures == []


def test_a_replica_killed_under_load_is_replaced_and_the_service_keeps_answering(app):
    with traffic(app["url"], 4) as (seen, failures):
        time.sleep(1)
        victim = _replicas()[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        until(lambda: any(r.actor_id != victim.actor_id for r in _replicas()), timeout=60)
        before = len(seen)
        until(lambda: len(seen) > before + 10, timeout=60)
    # The requests on the killed replica at that moment fail, and a client that retries at once may be routed
    # to it again until the ingress has dropped it (5 failures of 4 clients once in CI): failures in the first
    # seconds after the kill only, every later request answered.
    late = [what for at, what in failures if at > killed_at + 5]
    assert late == [] and len(seen) > 20, failures
