"""Canary rollouts (pipelines/serve/rollout.py, evidence.py): the split, the evidence's arithmetic, the
judge's decisions and its compare-and-swap on the registry (fast tier, and through the loopback S3
endpoint); then over real HTTP on the session cluster, with the judge run as users run it
(`python -m jobs.rollout`): a canary that starts, is promoted and is rolled back under 8 clients without a
failed request, on 2 replicas whose evidence adds up; a canary that fails its checksum and never answers;
and a shadow canary judged by the application's own timer (canary.auto), rolled back when damaged and
promoted when good."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import safetensors.torch
import yaml
from helpers import jpeg, serve_test_config, traffic, until, write_run
from ray import serve

from jobs.rollout import duration
from pipelines import storage
from pipelines.local_s3 import free_port
from pipelines.registry.promote import promote
from pipelines.registry.store import ChecksumError, ModelVersion, Registry
from pipelines.serve.deploy import deploy, load_serve_config
from pipelines.serve.evidence import Tally, Window
from pipelines.serve.model import Loaded, Served
from pipelines.serve.rollout import (
    CANARY,
    CONFLICT,
    PRODUCTION,
    PROMOTED,
    ROLLED_BACK,
    SHADOW,
    SHADOW_RUN,
    SPLIT,
    Criteria,
    NotServed,
    Pick,
    choose,
    decide,
    in_share,
    judge,
)
from pipelines.serve.settings import CanarySettings, ServeSettings, nest

CLASSES = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]


# -- the split ---------------------------------------------------------------------------------------------
def test_a_request_id_always_lands_on_the_same_side_and_the_share_is_the_setting():
    ids = [f"req-{i}" for i in range(2000)]
    first = [in_share(i, 20, salt="7") for i in ids]
    assert first == [in_share(i, 20, salt="7") for i in ids]  # a retry with the same id: the same version
    assert abs(sum(first) / len(ids) - 0.20) < 0.03
    assert first != [in_share(i, 20, salt="8") for i in ids]  # the next canary takes another slice
    assert not any(in_share(i, 0, "7") for i in ids) and all(in_share(i, 100, "7") for i in ids)


def _loaded(number: int) -> Loaded:
    meta = {"classes": CLASSES, "preprocessing": {"input_size": 48}}
    return Loaded(ModelVersion("tiny", number, f"mem://{number}", meta), model=None, device="cpu")


def test_who_answers_split_shadow_and_forced():
    prod, canary = _loaded(1), _loaded(2)
    picks = [choose(prod, canary, SPLIT, 50, f"r{i}", None) for i in range(200)]
    assert {p.role for p in picks} == {PRODUCTION, CANARY}
    assert all(p.loaded is (canary if p.role == CANARY else prod) and p.shadow is None for p in picks)
    assert all(choose(prod, canary, SPLIT, 100, f"r{i}", None, split=False) == Pick(prod) for i in range(20))
    shadowed = [choose(prod, canary, SHADOW, 50, f"r{i}", None) for i in range(200)]
    assert all(p.loaded is prod and p.role == PRODUCTION and not p.forced for p in shadowed)
    assert 50 < sum(p.shadow is canary for p in shadowed) < 150
    assert choose(prod, None, SPLIT, 100, "r", None) == Pick(prod)  # no canary
    assert choose(prod, _loaded(1), SPLIT, 100, "r", None).role == PRODUCTION  # the canary is production's version
    assert choose(prod, canary, SPLIT, 0, "r", "canary") == Pick(canary, CANARY, forced=True)
    assert choose(prod, canary, SPLIT, 100, "r", " 1") == Pick(prod, PRODUCTION, forced=True)
    with pytest.raises(NotServed, match=r"version 3 is not served here; served: \[1, 2\]"):
        choose(prod, canary, SPLIT, 10, "r", "3")
    with pytest.raises(NotServed, match=r"served: \[1\] \(production 1, no canary\)"):
        choose(prod, None, SPLIT, 10, "r", "canary")


def test_a_canary_serves_what_its_alias_names_or_nobody_and_a_promotion_takes_over_its_model(tmp_path):
    """One replica's Served on a local registry, checked by hand: the canary alias moving from a serving version
    straight to one that does not load serves nobody (not the previous one); cleared, it keeps its model for
    one check, so that production, moved to that version, takes it over instead of loading it again."""
    write_run(str(tmp_path / "run"), [50.0], CLASSES)
    root = str(tmp_path / "registry")
    for alias in ("production", "candidate", "spare"):  # versions 1, 2, 3
        promote(str(tmp_path / "run"), root, "tiny", alias=alias)
    reg, loads = Registry(root), []

    def load(version: ModelVersion) -> Loaded:
        loads.append(version.number)
        if version.number == 3:
            raise ChecksumError("versions/3/weights.safetensors: sha256 ... is not the registered ...")
        return _loaded(version.number)

    served = Served(reg, "tiny", "production", None, "candidate", 3600, load)
    assert (served.production.current.version.number, served.canary.current.version.number) == (1, 2)
    reg.move_alias("tiny", "candidate", 3, expected=reg.read_alias("tiny", "candidate"), why="test")
    assert served.check_now(timeout=30)
    state = served.canary.status()
    assert served.canary.current is None and (state.serving, state.refused) == (None, 3)
    assert "sha256" in state.load_error
    reg.move_alias("tiny", "candidate", 2, expected=reg.read_alias("tiny", "candidate"), why="test")
    assert served.check_now(timeout=30) and served.canary.current.version.number == 2
    canary_model = served.canary.current
    reg.clear_alias("tiny", "candidate", expected=reg.read_alias("tiny", "candidate"), why="test: promote")
    assert served.check_now(timeout=30) and served.canary.current is None
    reg.move_alias("tiny", "production", 2, expected=reg.read_alias("tiny", "production"), why="test: promote")
    assert served.check_now(timeout=30) and served.production.current is canary_model
    assert loads == [1, 2, 3, 2]  # version 2 loaded for the canary, then taken over by production


# -- the evidence ------------------------------------------------------------------------------------------
def _rounded(value):
    """Sums of floats added in another order differ in their last bits."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 9) if isinstance(value, float) else value


def test_two_replicas_evidence_adds_up_to_what_one_would_show_over_a_sliding_window():
    latencies = np.random.default_rng(0).lognormal(3, 0.6, 4000)
    one, a, b = Tally(), Tally(), Tally()
    for i, ms in enumerate(latencies):
        for tally in (one, a if i % 2 else b):
            tally.request(1, PRODUCTION, "ok", ms)
            tally.confidence(1, PRODUCTION, 0.5 + 0.1 * (i % 3))
            if i % 50 == 0:
                tally.request(2, CANARY, "error" if i % 100 else "client_error", ms)
    both, single, now = Window(), Window(), 1000.0
    report = [(1, a.take())]
    assert both.add("a", report, {"requests": 2000}, now) == 1
    assert both.add("a", report, {"requests": 2000}, now) == 1  # again: its answer was lost; added once
    both.add("b", [(1, b.take())], {"requests": 2000}, now + 0.5)
    single.add("x", [(1, one.take())], {}, now)
    summary = both.summary(60, now + 1)
    assert _rounded(summary["versions"]) == _rounded(single.summary(60, now + 1)["versions"])
    assert set(summary["replicas"]) == {"a", "b"}
    production = summary["versions"]["1"][PRODUCTION]
    assert production["requests"] == 4000 and production["mean_confidence"] == pytest.approx(0.6, abs=1e-3)
    for q in (50, 95):  # read from logarithmic buckets: within 5 %
        assert production["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(latencies, q), rel=0.05)
    assert summary["versions"]["2"][CANARY] | {"latency_ms": None} == {  # 4xx apart: the clients' errors
        "requests": 40, "errors": 40, "error_rate": 1.0, "client_errors": 40, "latency_ms": None, "images": 0,
        "mean_confidence": None,
    }  # fmt: skip
    # The window slides: 70 s later a 60 s window holds only what came since.
    a.request(1, PRODUCTION, "ok", 5.0)
    both.add("a", [*report, (2, a.take())], {"requests": 2001}, now + 70)  # report 1 is in already
    later = both.summary(60, now + 71)
    assert later["versions"]["1"][PRODUCTION]["requests"] == 1 and set(later["replicas"]) == {"a"}
    assert both.summary(3600, now + 71)["versions"]["1"][PRODUCTION]["requests"] == 4001


def test_shadow_runs_measure_agreement_and_the_confidence_gap():
    tally, window = Tally(), Window()
    tally.shadow(2, 10.0, canary_top1=0.7, production_top1=0.5, agreed=True)
    tally.shadow(2, 10.0, canary_top1=0.3, production_top1=0.5, agreed=False)
    tally.shadow(2, 10.0, canary_top1=0.6, production_top1=0.4, agreed=True)
    tally.shadow(2, 0.0)  # a failed run
    window.add("r", [(1, tally.take())], {}, 10.0)
    shadow = window.summary(60, 11.0)["versions"]["2"][SHADOW_RUN]
    assert (shadow["requests"], shadow["errors"], shadow["images"]) == (4, 1, 3)
    assert shadow["agreement"] == pytest.approx(2 / 3) and shadow["confidence_gap"] == pytest.approx(0.2 / 3)


# -- the decision ------------------------------------------------------------------------------------------
def _stats(requests: int, errors: int = 0, p95: float | None = 20.0, agreement: float | None = None) -> dict:
    p50 = p95 and p95 / 2
    return {"requests": requests, "errors": errors, "latency_ms": {"p50": p50, "p95": p95}, "agreement": agreement}


def _evidence(mode: str, canary: dict, replicas: dict | None = None) -> dict:
    return {"window_s": 600.0, "canary": {"alias": "candidate", "mode": mode, "percent": 10},
            "versions": {"1": {PRODUCTION: _stats(5000)}, "2": {CANARY if mode == SPLIT else SHADOW_RUN: canary}},
            "replicas": replicas or {}}  # fmt: skip


REFUSED = {"r1": {"canary_refused": 2, "canary_error": "ChecksumError: sha256 ..."}, "r2": {"canary_refused": None}}


@pytest.mark.parametrize(
    "mode,canary,replicas,action,reason",
    [
        (SPLIT, _stats(99), None, "wait", "99 requests on version 2 in the last 600 s, 100 needed"),
        (SPLIT, _stats(100, errors=1, p95=29.0), None, "promote", "p95 latency 29.0 ms, 1.45x production's"),
        (SPLIT, _stats(100, errors=2), None, "rollback", r"error rate 2.00% \(at most 1.00%\)"),
        (SPLIT, _stats(100, p95=31.0), None, "rollback", "1.55x production's 20.0 ms"),
        (SHADOW, _stats(99, agreement=1.0), None, "wait", "99 compared answers"),
        (SHADOW, _stats(100, agreement=0.9), None, "promote", r"top-1 agreement with production 90.0%"),
        (SHADOW, _stats(100, agreement=0.89), None, "rollback", r"top-1 agreement with production 89.0%"),
        (SHADOW, _stats(100, errors=100, p95=None, agreement=None), None, "rollback", "no shadow run of version 2"),
        (SPLIT, _stats(0), REFUSED, "rollback", "version 2 does not load on 1 replica.*ChecksumError"),
    ],
    ids=["too-few", "good", "errors", "slow", "shadow-too-few", "agrees", "disagrees", "all-failed", "refused"],
)
def test_the_judge_decides_on_the_criteria(mode, canary, replicas, action, reason):
    criteria = Criteria(min_requests=100, max_error_rate=0.01, max_latency_ratio=1.5, min_agreement=0.9)
    decision = decide(_evidence(mode, canary, replicas), production=1, canary=2, criteria=criteria)
    assert decision.action == action
    assert any(re.search(reason, r) for r in decision.reasons), decision.reasons
    assert decision.evidence[CANARY]["version"] == 2 and decision.evidence["criteria"]["min_requests"] == 100


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.slow), "local"])
def root(request, tmp_path) -> str:
    """A registry in S3 or on a local path, with version 1 as production and version 2 as the candidate."""
    if request.param == "local":
        uri = str(tmp_path / "registry")
    else:
        request.getfixturevalue("s3_endpoint")
        uri = f"s3://rollout-test/{request.node.name.replace('[', '-').rstrip(']')}"
        storage.ensure_bucket(uri)
    write_run(str(tmp_path / "run"), [50.0], CLASSES)
    promote(str(tmp_path / "run"), uri, "tiny")
    promote(str(tmp_path / "run"), uri, "tiny", alias="candidate")  # the same run registered again
    return uri


@pytest.mark.parametrize("losing", ["promote", "rollback"])
def test_two_judges_at_once_cannot_both_move_an_alias(root, losing):
    """Two judges read the same aliases (a barrier holds both after their reads), one would promote, the other
    (stricter) roll back: exactly one acts, the other changes nothing and says why."""
    barrier, cleared, state = threading.Barrier(2), threading.Event(), threading.local()

    class Racing(Registry):  # the real registry, paused once per judge after it has read the canary alias
        def read_alias(self, model, alias):
            found = super().read_alias(model, alias)
            if alias == "candidate" and not getattr(state, "paused", False):
                state.paused = True
                barrier.wait(timeout=60)
                if state.name == losing:  # the other clears first: this one loses the compare-and-swap
                    assert cleared.wait(timeout=60)
            return found

        def clear_alias(self, *args, **kwargs):
            try:
                return super().clear_alias(*args, **kwargs)
            finally:
                cleared.set()

    evidence = _evidence(SHADOW, _stats(500, agreement=0.95))
    lenient, strict = Criteria(min_requests=100, min_agreement=0.9), Criteria(min_requests=100, min_agreement=0.99)
    decisions = {}

    def run(name: str, criteria: Criteria) -> None:
        state.name = name
        decisions[name] = judge(Racing(root), "tiny", "production", "candidate", evidence, criteria)

    threads = [threading.Thread(target=run, args=a) for a in (("promote", lenient), ("rollback", strict))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = "rollback" if losing == "promote" else "promote"
    assert decisions[losing].action == CONFLICT and "not cleared" in decisions[losing].reasons[0]
    assert decisions[winner].action == (PROMOTED if winner == "promote" else ROLLED_BACK)
    reg = Registry(root)
    candidate, production = reg.read_alias("tiny", "candidate")[0], reg.read_alias("tiny", "production")[0]
    assert candidate["version"] is None and [e["version"] for e in candidate["history"]] == [2, None]
    assert candidate["history"][-1]["evidence"][CANARY]["agreement"] == 0.95
    assert production["version"] == (2 if winner == "promote" else 1)
    assert len(production["history"]) == (2 if winner == "promote" else 1)


# -- the settings ------------------------------------------------------------------------------------------
def test_canary_settings_from_the_config_file_serve_run_and_flags():
    s = ServeSettings(**nest({"registry": "r", "model": "m", "canary": {"alias": "candidate", "mode": "shadow"},
                              "canary.percent": "25", "canary.auto": "true"}))  # fmt: skip
    assert (s.canary.alias, s.canary.mode, s.canary.percent, s.canary.auto) == ("candidate", "shadow", 25.0, True)
    assert ServeSettings(**s.to_dict()) == s  # what the application's replicas are given back
    for bad, message in [
        ({"canary.mode": "ab"}, "split or shadow"),
        ({"canary.percent": 120}, r"within 0\.\.100"),
        ({"canary.alias": "production"}, "is the served alias"),
        ({"canary.min_agreement": 2}, "criteria"),
        ({"canary.percentage": 5}, "canary: no setting percentage"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServeSettings(**nest({"registry": "r", "model": "m", **bad}))
    # infra/serve.yaml documents every canary setting, at the defaults the judge job has too.
    documented = load_serve_config("infra/serve.yaml")["applications"][0]["args"]["canary"]
    assert set(documented) == {f.name for f in dataclasses.fields(CanarySettings)}
    assert CanarySettings(**documented) == CanarySettings()
    assert [duration(t) for t in ("90", "90s", "10m", "1h", "0.5m")] == [90, 90, 600, 3600, 30]


# -- over HTTP, on the session cluster ---------------------------------------------------------------------
ROOT = "s3://rollout-test/registry"
ADMIN_TOKEN = "r0llout-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SMALL = jpeg(3, 64, 48)  # cheap to decode: the tests send thousands


@pytest.fixture(scope="module")
def served(ray_cluster, s3_endpoint, tmp_path_factory):
    """Runs a (production, version 1 of "tiny") and b in S3, and the admin token's file; Serve shut down at
    the end (the next module starts it on its own port)."""
    storage.ensure_bucket(ROOT)
    for name, seed in (("a", 0), ("b", 100)):
        write_run(f"s3://rollout-test/runs/{name}", [50.0], CLASSES, seed=seed)
    token = tmp_path_factory.mktemp("admin") / "token"
    token.write_text(ADMIN_TOKEN)
    yield {"token": str(token), "registry": Registry(ROOT), "port": free_port(), "address": ray_cluster["address"]}
    serve.shutdown()


def _config(served: dict, name: str, replicas: int) -> dict:
    """infra/serve.yaml with the tests' timings, ``replicas`` fixed, polling every second, the admin token."""
    config = serve_test_config()
    config["applications"][0].update(name=name, route_prefix=f"/{name}")
    config["applications"][0]["args"].update(poll_interval_s=1.0, admin_token_file=served["token"])
    (options,) = config["applications"][0]["deployments"]
    del options["autoscaling_config"]
    options["num_replicas"] = replicas
    return config


@contextlib.contextmanager
def _jobs_serve(served: dict, tmp: Path, name: str, model: str, *flags: str):
    """`python -m jobs.serve --config <the tests' config> ... <flags>` on the session cluster, as a user runs it
    there; Ctrl-C at the end. Yields the application's URL."""
    promote("s3://rollout-test/runs/a", ROOT, model)
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump(_config(served, name, replicas=2)))
    out = tmp / "serve.out"
    cmd = [sys.executable, "-m", "jobs.serve", "--registry", ROOT, "--model", model, "--config", str(config),
           "--port", str(served["port"]), *flags]  # fmt: skip
    with out.open("w") as sink:
        env = {**os.environ, "RAY_ADDRESS": served["address"]}
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        until(lambda: "serving " in out.read_text() or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, out.read_text()[-3000:]
        yield f"http://127.0.0.1:{served['port']}/{name}"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out.read_text()[-3000:]


def _status(url: str) -> dict:
    return requests.get(f"{url}/v1/admin/status", params={"window": 3600}, headers=ADMIN, timeout=30).json()


def _judge(url: str, served: dict, model: str, *flags: str) -> subprocess.Popen:
    """``python -m jobs.rollout`` as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.rollout", "--url", url, "--registry", ROOT, "--model", model,
         "--admin-token-file", served["token"], *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _replicas_serve(url: str, canary: int | None, refused: int | None = None, n: int = 2) -> bool:
    replicas = _status(url)["rollout"]["replicas"].values()

    return len(replicas) == n and all(
        r["canary"] == canary and r["canary_refused"] == refused and r["seconds_ago"] < 2 for r in replicas
    )


def _damaged(reg: Registry, model: str, source: int, tmp: Path) -> ModelVersion:
    """``source``'s weights with the classifier's rows rotated by one: a valid model whose top-1 is never
    production's (agreement 0)."""
    version = reg.get(model, source)
    weights = safetensors.torch.load(reg.read_weights(version))
    for key in [k for k in weights if k.startswith("head.")]:
        weights[key] = weights[key].roll(1, dims=0)
    path = tmp / "damaged.safetensors"
    safetensors.torch.save_file(weights, str(path))
    return reg.register(model, path, version.meta)


def test_a_canary_starts_is_promoted_and_another_rolled_back_under_8_clients_without_a_failed_request(served, tmp_path):
    with _jobs_serve(served, tmp_path, "split", "tiny", "--canary-alias", "candidate", "--canary-percent", "20",
                     "--canary-mode", "split") as url:  # fmt: skip
        _canary_under_traffic(served, url, tmp_path)


def _canary_under_traffic(served: dict, url: str, tmp_path: Path) -> None:
    reg = served["registry"]
    status = _status(url)
    assert status["canary"]["version"] is None and status["canary"]["why_not"] == "the alias candidate names no version"
    with traffic(url, 8, SMALL) as (seen, failures):
        # 1. A canary starts: run a registered again (version 2), named by the candidate alias.
        promote("s3://rollout-test/runs/a", ROOT, "tiny", alias="candidate")
        until(lambda: _replicas_serve(url, canary=2), timeout=20)
        # The share: 2,000 requests with ids of their own, each on the side its id hashes to.
        ids = [f"share-{i}" for i in range(2000)]

        def version_of(request_id: str) -> int:
            r = requests.post(f"{url}/v1/classify", data=SMALL, headers={"X-Request-ID": request_id}, timeout=60)
            return r.json()["version"]

        with ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(version_of, ids))
            again = list(pool.map(version_of, ids[:200]))  # retries that repeat their ids
        assert set(versions) == {1, 2} and abs(versions.count(2) / len(ids) - 0.20) < 0.03
        assert again == versions[:200]
        forced = requests.post(f"{url}/v1/classify", data=SMALL, headers={"X-Model-Version": "canary"}, timeout=60)
        assert forced.json()["version"] == 2
        # 2. Judged on its evidence by two judges at once: one promotes it, the other finds nothing left to do
        # or loses the compare-and-swap.
        judges = [_judge(url, served, "tiny", "--min-requests", "100", "--max-latency-ratio", "5") for _ in "ab"]
        outcomes = [(*j.communicate(timeout=60), j.returncode) for j in judges]
        outcomes = [(code, out, err) for out, err, code in outcomes]
        codes = sorted(code for code, _, _ in outcomes)
        assert codes in ([0, 4], [0, 5]), outcomes
        promoted = next(out for code, out, _ in outcomes if code == 0)
        assert "tiny:candidate (version 2) against production (version 1): promoted" in promoted
        assert json.loads(promoted[promoted.index("{") :])["decision"]["evidence"][CANARY]["requests"] >= 100
        until(lambda: _replicas_serve(url, canary=None) and _status(url)["version"] == 2, timeout=20)
        mark = len(seen)
        until(lambda: len(seen) > mark + 50, timeout=30)
        assert set(seen[mark:]) == {2}
        # 3. A canary (run b) starts; its alias then moves straight to a version whose weights fail their
        # checksum: every replica refuses it and serves no canary at all (not the previous one), it never answers,
        # and the judge rolls it back at once (no evidence needed).
        other, _ = promote("s3://rollout-test/runs/b", ROOT, "tiny", alias="candidate")
        until(lambda: other.number in seen[mark:], timeout=20)
        bad = reg.register("tiny", _download(reg, 2, tmp_path), reg.get("tiny", 2).meta)
        data = bytearray(storage.read_bytes(bad.weights_uri))
        data[-1] ^= 1
        storage.write_bytes(bad.weights_uri, bytes(data))
        reg.move_alias("tiny", "candidate", bad.number, expected=reg.read_alias("tiny", "candidate"), why="test")
        until(lambda: _replicas_serve(url, canary=None, refused=bad.number), timeout=20)
        assert "sha256" in _status(url)["canary"]["why_not"]
        mark = len(seen)
        until(lambda: len(seen) > mark + 50, timeout=30)
        assert set(seen[mark:]) == {2}
        refused = requests.post(f"{url}/v1/classify", data=SMALL, headers={"X-Model-Version": str(bad.number)})
        assert refused.status_code == 404 and "no canary" in refused.json()["error"]
        judge = _judge(url, served, "tiny", "--min-requests", "100")
        out, err = judge.communicate(timeout=60)
        assert judge.returncode == 3 and f"version {bad.number} does not load on 2 replica(s)" in out, (out, err)
        # 4. The canary that served (run b) named again, failing the judge's criteria (an impossible latency
        # ratio): rolled back, and its share goes back to production.
        reg.move_alias("tiny", "candidate", other.number, expected=reg.read_alias("tiny", "candidate"), why="test")
        until(lambda: other.number in seen[mark:], timeout=20)
        for _ in range(30):  # as a scheduler calls it: again while the evidence is too little (75)
            judge = _judge(url, served, "tiny", "--min-requests", "20", "--max-latency-ratio", "0.01")
            out, err = judge.communicate(timeout=60)
            if judge.returncode != 75:
                break
            time.sleep(0.5)
        assert judge.returncode == 3, (out, err)
        until(lambda: _replicas_serve(url, canary=None), timeout=20)
        mark = len(seen)
        until(lambda: len(seen) > mark + 50, timeout=30)
        assert set(seen[mark:]) == {2}
    assert failures == [] and bad.number not in seen
    # Each replica reported its own requests; the evidence is their sum.
    status = _status(url)
    replicas = status["rollout"]["replicas"]

    def counted() -> int:
        return sum(roles[r]["requests"] for roles in _status(url)["rollout"]["versions"].values()
                   for r in (PRODUCTION, CANARY) if r in roles)  # fmt: skip

    until(lambda: counted() == sum(r["requests"] for r in _status(url)["rollout"]["replicas"].values()), timeout=10)
    assert len(replicas) == 2 and all(r["requests"] > 100 for r in replicas.values())
    history = reg.read_alias("tiny", "candidate")[0]["history"]
    assert [e["version"] for e in history] == [2, None, other.number, bad.number, None, other.number, None]
    # The same figures as Ray metrics, from the node's metrics agent (what Prometheus scrapes).
    port = ray.nodes()[0]["MetricsExportPort"]

    def exported() -> str:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    until(lambda: re.search(r'crossvit_rollout_requests\{[^}]*role="canary"[^}]*version="2"', exported()), 30)
    assert re.search(r'crossvit_request_ms_bucket\{[^}]*role="canary"', exported())
    assert history[1]["why"].startswith("jobs.rollout: promote to production") and "evidence" in history[1]


def _download(reg: Registry, number: int, tmp: Path) -> Path:
    path = tmp / f"v{number}.safetensors"
    path.write_bytes(reg.read_weights(reg.get("tiny", number)))
    return path


def test_a_shadow_canary_is_judged_by_the_application_itself(served, tmp_path):
    """canary.auto: a damaged canary in production's shadow (agreement 0) is rolled back, a good one (the same
    run registered again) promoted, by the application's timer; the shadow never answers a client."""
    reg, model = served["registry"], "shadowed"
    canary = {"alias": "candidate", "percent": 100, "mode": SHADOW, "auto": True, "every_s": 1, "window_s": 60,
              "min_requests": 20, "max_latency_ratio": 10}  # fmt: skip
    promote("s3://rollout-test/runs/a", ROOT, model)
    url = deploy(_config(served, "shadow", replicas=1), {"registry": ROOT, "model": model, "canary": canary},
                 port=served["port"])  # fmt: skip
    with traffic(url, 4, SMALL) as (seen, failures):
        damaged = _damaged(reg, model, 1, tmp_path)
        reg.move_alias(model, "candidate", damaged.number, expected=(None, None), why="test: damaged")
        until(lambda: reg.read_alias(model, "candidate")[0]["version"] is None, timeout=30)
        good, _ = promote("s3://rollout-test/runs/a", ROOT, model, alias="candidate")
        until(lambda: reg.read_alias(model, "production")[0]["version"] == good.number, timeout=30)
        mark = len(seen)
        until(lambda: good.number in seen[mark:], timeout=20)
    assert failures == [] and damaged.number not in seen
    rolled_back = reg.read_alias(model, "candidate")[0]["history"][1]
    assert rolled_back["why"].startswith("canary.auto: rolled back: top-1 agreement with production 0.0%")
    assert rolled_back["evidence"][CANARY]["agreement"] == 0.0
    production = reg.read_alias(model, "production")[0]["history"]
    assert damaged.number not in [e["version"] for e in production]  # it never became production
    promoted = production[-1]
    assert promoted["why"].startswith("canary.auto: canary candidate promoted")
    assert promoted["evidence"][CANARY]["agreement"] == 1.0
    last = _status(url)["rollout"]["last_auto_decision"]
    assert last["action"] == PROMOTED and last["canary"] == good.number
    serve.delete("shadow")
