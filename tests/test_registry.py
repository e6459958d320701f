"""The model registry and promotion, on the loopback S3 endpoint and on local paths: layout, gate, rollback,
compare-and-swap (a stale ETag, real races, a lost response, a lock left by a dead writer), checksums, and the
promote job as a user runs it."""

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import write_run

import crossvit
from pipelines import storage
from pipelines.data.dataset import load_manifest
from pipelines.registry.promote import GateRefusedError, best_checkpoint, promote
from pipelines.registry.store import AliasMovedError, ChecksumError, Registry, RegistryError

CLASSES = [{"index": i, "wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(4)]


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.slow), "local"])
def root(request, tmp_path) -> str:
    """A registry root in S3 or on a local path, empty for each test (local ones are in the fast tier)."""
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("s3_endpoint")
    uri = f"s3://registry-test/{request.node.name.replace('[', '-').rstrip(']')}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture
def s3_root(request, store) -> str:
    """A registry root in S3 for a test that breaks the storage proxy (``store``)."""
    uri = f"s3://registry-test/{request.node.name.replace('[', '-').rstrip(']')}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Runs as training leaves them, in a local folder (promotion reads runs in S3 in test_serve and
    test_label): "a" peaks at epoch 1 (80 %) and its last checkpoint was not evaluated; "b" reaches 85 %, "c"
    only 60 %."""
    folder = tmp_path_factory.mktemp("runs")
    out = {name: str(folder / name) for name in ("a", "b", "c")}
    write_run(out["a"], [50.0, 80.0, 70.0, None], CLASSES, seed=0)
    write_run(out["b"], [85.0], CLASSES, seed=10)
    write_run(out["c"], [60.0], CLASSES, seed=20)
    return out


def test_the_best_evaluated_checkpoint_is_chosen_not_the_newest(runs):
    candidate = best_checkpoint(runs["a"])
    assert candidate.checkpoint.endswith("checkpoint_000001") and candidate.top1 == 80.0


def test_a_promotion_registers_a_complete_version_and_moves_the_alias(runs, root, tmp_path):
    version, record = promote(runs["a"], root, "tiny")
    assert (version.number, record["version"], record["previous"]) == (1, 1, None)
    folder = storage.join(root, "tiny", "versions", "1")
    assert sorted(storage.list_files(folder)) == [storage.join(folder, "model.json"),
                                                  storage.join(folder, "weights.safetensors")]  # fmt: skip
    meta = json.loads(storage.read_bytes(storage.join(folder, "model.json")))
    weights = storage.read_bytes(storage.join(folder, "weights.safetensors"))
    assert meta["status"] == "ready" and meta["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["classes"] == CLASSES and meta["config"]["num_classes"] == 4 and meta["config"]["img_size"] == 48
    assert meta["preprocessing"] == {"input_size": 48, "crop_pct": 0.875, "resize_short_side": 54,
                                     "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert meta["source"]["run"] == runs["a"] and meta["source"]["checkpoint"].endswith("checkpoint_000001")
    assert meta["metrics"]["val_top1"] == 80.0 and meta["data_fingerprint"] == "f" * 64 and meta["created"]
    alias = json.loads(storage.read_bytes(storage.join(root, "tiny", "aliases", "production.json")))
    assert alias["version"] == 1 and alias["history"][0]["who"] and alias["history"][0]["when"]
    # The registered model is the checkpoint's, loaded from safetensors after its checksum.
    reg = Registry(root)
    model = reg.load(reg.resolve("tiny", "production"))
    expected = crossvit.load_model(
        _download(storage.join(meta["source"]["checkpoint"], "weights.safetensors"), tmp_path)
    )
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(model(x), expected.eval()(x))


def test_the_gate_refuses_worse_candidates_and_writes_nothing(runs, root):
    promote(runs["a"], root, "tiny")  # 80 %
    with pytest.raises(
        GateRefusedError, match=r"candidate top-1 60.00 is below tiny:production \(version 1\) at 80.00"
    ):
        promote(runs["c"], root, "tiny")
    with pytest.raises(GateRefusedError, match=r"below --min-top1 90\.00"):
        promote(runs["b"], root, "tiny", min_top1=90)
    assert Registry(root).version_numbers("tiny") == [1]  # nothing registered for a refused candidate
    version, record = promote(runs["c"], root, "tiny", force=True)
    assert record["version"] == version.number == 2 and record["previous"] == 1


def test_rollback_steps_back_along_the_aliases_lineage(runs, root):
    promote(runs["c"], root, "tiny")  # v1, 60 %
    promote(runs["a"], root, "tiny")  # v2, 80 %
    promote(runs["b"], root, "tiny")  # v3, 85 %
    reg = Registry(root)
    assert reg.rollback("tiny", "production")["version"] == 2
    assert reg.rollback("tiny", "production")["version"] == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("tiny", "production")
    record, _ = reg.read_alias("tiny", "production")
    assert [e["version"] for e in record["history"]] == [1, 2, 3, 2, 1]


def test_clearing_an_alias_is_compare_and_swap_and_recorded_in_its_history(runs, root):
    promote(runs["a"], root, "tiny")  # v1, production
    promote(runs["b"], root, "tiny", alias="candidate")  # v2
    reg = Registry(root)
    read = reg.read_alias("tiny", "candidate")
    record = reg.clear_alias("tiny", "candidate", expected=read, why="test: rolled back", evidence={"agreement": 0.1})
    assert record == reg.read_alias("tiny", "candidate")[0] and (record["version"], record["previous"]) == (None, 2)
    assert record["history"][-1]["why"] == "test: rolled back" and record["history"][-1]["evidence"] == {
        "agreement": 0.1
    }
    with pytest.raises(AliasMovedError, match=r"tiny:candidate was moved or cleared .*now no version\); not cleared"):
        reg.clear_alias("tiny", "candidate", expected=read, why="a second judge")  # what it read is gone
    with pytest.raises(RegistryError, match="there is nothing to clear"):
        reg.clear_alias("tiny", "candidate", expected=reg.read_alias("tiny", "candidate"), why="again")
    with pytest.raises(RegistryError, match=r"tiny:candidate names no version \(cleared"):
        reg.resolve("tiny", "candidate")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("tiny", "candidate")
    assert "candidate" not in reg.table("tiny")
    promote(runs["c"], root, "tiny", alias="candidate")  # a new canary: no gate against the cleared one
    record = reg.read_alias("tiny", "candidate")[0]
    assert [e["version"] for e in record["history"]] == [2, None, 3] and record["lineage"] == [2, 3]


def test_weights_that_changed_after_registration_are_refused_by_name(runs, root):
    version, _ = promote(runs["a"], root, "tiny")
    data = bytearray(storage.read_bytes(version.weights_uri))
    data[-1] ^= 1  # one bit in the last tensor
    storage.write_bytes(version.weights_uri, bytes(data))
    with pytest.raises(ChecksumError, match=r"versions/1/weights.safetensors: sha256 .* is not the registered"):
        Registry(root).load(version)


def test_an_alias_moved_since_it_was_read_is_not_moved_again(runs, root, tmp_path):
    """The refusal path, deterministically: a promotion read the alias (ETag / hash), another moved it
    meanwhile; the first one's move is refused, its version stays registered and complete."""
    reg = Registry(root)
    promote(runs["a"], root, "tiny")
    stale = reg.read_alias("tiny", "production")
    promote(runs["b"], root, "tiny")  # moves the alias to version 2
    mine = reg.register("tiny", _download(reg.get("tiny", 1).weights_uri, tmp_path), reg.get("tiny", 1).meta)
    with pytest.raises(AliasMovedError, match=r"tiny:production was moved by another promotion .*now version 2"):
        reg.move_alias("tiny", "production", mine.number, expected=stale, why="test")
    assert reg.read_alias("tiny", "production")[0]["version"] == 2
    assert reg.get("tiny", mine.number).meta["status"] == "ready"
    # A copied model.json names another version: the registry's own fields win.
    assert (mine.number, mine.meta["version"], reg.get("tiny", mine.number).meta["version"]) == (3, 3, 3)


@pytest.mark.parametrize("first", [False, True], ids=["new-alias", "existing-alias"])
def test_an_alias_move_whose_response_was_lost_is_done_not_moved_meanwhile(runs, s3_root, store, tmp_path, first):
    """The PUT lands but its response is lost: boto3 sends it again, and the retry meets the first attempt's
    write (412: the ETag changed, or the new alias exists). The registry recognises its own record (its
    write_id) and reports the move done; this is not another promotion's move."""
    version, _ = promote(runs["a"], s3_root, "tiny", alias="staging")
    reg = Registry(s3_root)
    if first:
        reg.move_alias("tiny", "production", version.number, expected=(None, None), why="first")
    mine = reg.register("tiny", _download(version.weights_uri, tmp_path), version.meta)
    expected = reg.read_alias("tiny", "production")
    key = f"{s3_root.removeprefix('s3://')}/tiny/aliases/production.json"
    store.faults.lose_response = {key: 1}
    store.reset_counts()
    record = reg.move_alias("tiny", "production", mine.number, expected=expected, why="test")
    assert store.faults.lose_response == {key: 0} and store.counts["PUT"] == 2, dict(store.counts)
    assert record["version"] == mine.number == 2
    assert reg.read_alias("tiny", "production")[0] == record


def test_a_claim_whose_response_was_lost_keeps_its_number(runs, s3_root, store, tmp_path):
    """The claim of version 1 lands but its response is lost; boto3's retry meets it (412: If-None-Match).
    The claim is recognised as this process's own: version 1, not 2 beside an orphan "uploading" 1."""
    version, _ = promote(runs["a"], s3_root, "other")
    key = f"{s3_root.removeprefix('s3://')}/tiny/versions/1/model.json"
    store.faults.lose_response = {key: 1}
    reg = Registry(s3_root)
    mine = reg.register("tiny", _download(version.weights_uri, tmp_path), version.meta)
    assert store.faults.lose_response == {key: 0}
    assert mine.number == 1 and reg.version_numbers("tiny") == [1]
    assert reg.get("tiny", 1).meta["status"] == "ready"


def _a_pid_that_does_not_run() -> int:
    """A process id that no process has (without starting one): above Linux's largest pid_max, 2**22."""
    pid = 2**22 + 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


_REPLACE_IF = storage.replace_if


def _lock_wait_s(monkeypatch, seconds: float) -> None:
    """The registry's writes wait ``seconds`` for a held lock (5 s by default), so that a test need not."""
    monkeypatch.setattr(storage, "replace_if", lambda *args, **kw: _REPLACE_IF(*args, **kw, lock_wait_s=seconds))


def test_a_lock_left_by_a_dead_process_on_this_host_is_recovered_at_once(runs, tmp_path, monkeypatch, caplog):
    """A writer killed while it held a local alias's lock: the lock names its pid and this host, and that pid
    no longer runs, so the next writer removes the lock at once (and says so). A live writer's lock, another
    host's, or one not yet written (empty), is waited for and then named, as before."""
    root = str(tmp_path / "registry")
    promote(runs["c"], root, "tiny")  # v1
    promote(runs["a"], root, "tiny")  # v2
    reg = Registry(root)
    lock = Path(root, "tiny", "aliases", "production.json.lock")
    dead = _a_pid_that_does_not_run()
    lock.write_text(f"pid {dead} on {socket.gethostname()} since 2020-01-01T00:00:00Z")
    _lock_wait_s(monkeypatch, 60)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        assert reg.rollback("tiny", "production")["version"] == 1
    assert time.monotonic() - start < 30  # not the 60 s a held lock would be waited for
    assert f"{lock}: removed a lock left by pid {dead} on this host" in caplog.text
    assert not lock.exists() and list(lock.parent.iterdir()) == [lock.parent / "production.json"]
    _lock_wait_s(monkeypatch, 0.3)
    # A live pid's lock, another host's (whose pids this one cannot see), one not written yet: waited for.
    for held in (f"pid {os.getpid()} on {socket.gethostname()} since now", f"pid {dead} on elsewhere since now", ""):
        lock.write_text(held)
        with pytest.raises(RegistryError, match=rf"production.json.lock exists \({re.escape(held)}\) since over 0.3 s"):
            reg.move_alias("tiny", "production", 2, expected=reg.read_alias("tiny", "production"), why="test")
        assert lock.read_text() == held
    assert reg.read_alias("tiny", "production")[0]["version"] == 1


def test_a_stale_lock_taken_meanwhile_by_a_new_writer_is_left_to_it(runs, tmp_path, monkeypatch):
    """Two writers find the same dead writer's lock: the first removes it and locks anew, and the second, about
    to remove what it read, must not remove the new lock. It moves the lock aside, sees it is not what it
    read, and puts it back: the new writer keeps its lock."""
    root = str(tmp_path / "registry")
    promote(runs["c"], root, "tiny")
    promote(runs["a"], root, "tiny")
    lock = Path(root, "tiny", "aliases", "production.json.lock")
    lock.write_text(f"pid {_a_pid_that_does_not_run()} on {socket.gethostname()} since 2020-01-01T00:00:00Z")
    new_writer = f"pid {os.getpid()} on {socket.gethostname()} since now"
    real_rename = os.rename

    def first_recoverer_wins(src, dst):  # between this writer's read of the lock and its rename
        if Path(src) == lock and lock.read_text() != new_writer:
            lock.unlink()
            lock.write_text(new_writer)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", first_recoverer_wins)
    _lock_wait_s(monkeypatch, 0.3)
    with pytest.raises(RegistryError, match=r"production.json.lock exists \(pid"):
        Registry(root).rollback("tiny", "production")
    assert lock.read_text() == new_writer
    assert sorted(p.name for p in lock.parent.iterdir()) == ["production.json", "production.json.lock"]


@pytest.mark.parametrize("first", [False, True], ids=["new-alias", "existing-alias"])
def test_concurrent_promotions_each_get_a_version_and_exactly_one_alias_move_wins(runs, tmp_path, monkeypatch, first):
    """A real race on a local path: four promotions in threads, each held after reading the alias until all
    have read it, so that they all compare with the same state; then they claim version numbers and move the
    alias at once (an alias that does not exist yet: exclusive creates; one that does: the lock file). The
    S3 side is tested deterministically above and below: moto's server checks a condition and then writes
    without a lock, so a race against it would test moto, not S3."""
    root = str(tmp_path / "registry")
    if first:
        promote(runs["c"], root, "tiny")
    barrier = threading.Barrier(4, timeout=60)
    real_read = Registry.read_alias

    reads = threading.local()

    def read_then_wait(self, model, alias):
        found = real_read(self, model, alias)
        if not getattr(reads, "done", False):  # the promotion's read, not the loser's look at the winner
            reads.done = True
            barrier.wait()
        return found

    monkeypatch.setattr(Registry, "read_alias", read_then_wait)
    outcomes: list = []

    def one(run: str) -> None:
        try:
            outcomes.append(promote(run, root, "tiny", force=True)[0].number)
        except AliasMovedError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=one, args=(runs[k],)) for k in ("a", "b", "c", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(Registry, "read_alias", real_read)
    winners = [o for o in outcomes if isinstance(o, int)]
    assert len(winners) == 1 and sum(isinstance(o, AliasMovedError) for o in outcomes) == 3, outcomes
    reg = Registry(root)
    assert reg.version_numbers("tiny") == list(range(1, 5 + first))  # each its own number, each complete
    assert all(v.meta["status"] == "ready" for v in reg.versions("tiny"))
    record, _ = reg.read_alias("tiny", "production")
    assert record["version"] == winners[0] and len(record["history"]) == 1 + first
    assert not list(Path(root).rglob("*.lock"))


def test_a_version_number_is_claimed_once_and_a_left_lock_is_named(runs, root, monkeypatch):
    """Deterministic halves of the race: a second claim of a number fails (S3: If-None-Match); on a local
    path, a lock left by a killed writer is named in the error, not taken for another promotion."""
    _lock_wait_s(monkeypatch, 2.0)  # 5 s by default; the live writer below keeps its lock 0.3 s
    claim = storage.join(root, "tiny", "versions", "7", "model.json")
    storage.create_exclusive(claim, b"{}")
    with pytest.raises(storage.PreconditionFailed):
        storage.create_exclusive(claim, b"{}")
    if storage.parse(root).is_s3:
        return
    promote(runs["a"], root, "tiny")
    lock = Path(root, "tiny", "aliases", "production.json.lock")
    # A live writer's lock (released 0.3 s later) is waited out: the answer is the comparison's, not "busy".
    _, tag = Registry(root).read_alias("tiny", "production")
    lock.write_text("pid 1 on here since now")
    threading.Timer(0.3, lock.unlink).start()
    with pytest.raises(storage.PreconditionFailed) as refused:
        storage.replace_if(storage.join(root, "tiny", "aliases", "production.json"), b"{}", "stale-tag")
    assert not isinstance(refused.value, storage.LockHeld) and not lock.exists()
    lock.write_text("pid 1 on elsewhere since then")
    with pytest.raises(RegistryError, match=r"production.json.lock exists \(pid 1 on elsewhere"):
        promote(runs["b"], root, "tiny")
    assert Registry(root).read_alias("tiny", "production")[1] == tag  # neither refused write touched it


def test_fresh_evaluation_on_the_same_data_decides_the_gate(runs, ray_cluster, sample_shards, tmp_path):
    """--eval-data: both models are evaluated on one split of one data set, and those numbers gate (not
    the 20 % vs 80 % the runs recorded: two untrained models score alike here)."""
    data = sample_shards
    manifest = load_manifest(data)
    storage.ensure_bucket("s3://runs-test")
    root = str(tmp_path / "registry")
    write_run("s3://runs-test/d", [80.0], manifest["classes"], seed=30)
    write_run("s3://runs-test/e", [20.0], manifest["classes"], seed=30)  # the same weights, recorded lower
    promote("s3://runs-test/d", root, "tiny")
    with pytest.raises(GateRefusedError):
        promote("s3://runs-test/e", root, "tiny")
    version, record = promote("s3://runs-test/e", root, "tiny", eval_data=data)
    evaluation = record["history"][-1]["evaluation"]
    assert evaluation["candidate_top1"] == evaluation["current_top1"]  # same weights, same data
    assert evaluation["data_fingerprint"] == manifest["fingerprint"] and version.number == 2
    with pytest.raises(RegistryError, match="classes are not those of"):
        promote(runs["a"], root, "tiny", eval_data=data, force=True)
    # The current version is damaged after registration: the gate cannot evaluate it and says so; --force
    # replaces it (the evaluation records why the current one has no figure).
    storage.write_bytes(Registry(root).get("tiny", 2).weights_uri, b"damaged")
    with pytest.raises(RegistryError, match=r"tiny:production \(version 2\) does not load.*--force to replace it"):
        promote("s3://runs-test/d", root, "tiny", eval_data=data)
    version, record = promote("s3://runs-test/d", root, "tiny", eval_data=data, force=True)
    assert version.number == 3 and record["version"] == 3
    assert "ChecksumError" in record["history"][-1]["evaluation"]["current_error"]


@pytest.mark.slow  # python -m jobs.promote, four times
def test_the_promote_job_as_a_user_runs_it(runs, tmp_path):
    """The CLI: promotion, a refusal (non-zero, the reason on one line), --list, --rollback."""
    root = str(tmp_path / "registry")

    def job(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "jobs.promote", "--registry", root, "--model", "tiny", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert job("--run", runs["a"]).returncode == 0
    refused = job("--run", runs["c"])
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "promote: refused: candidate top-1 60.00 is below tiny:production (version 1) at 80.00; "
        "--force to promote anyway"
    ]
    assert job("--run", runs["b"], "--alias", "production").returncode == 0
    listed = job("--list")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["version", "aliases", "top-1", "top-5", "epoch", "created", "run"]
    assert lines[1].split()[:3] == ["1", "-", "80.00"] and lines[2].split()[:3] == ["2", "production", "85.00"]
    rolled = job("--rollback")
    assert rolled.returncode == 0 and "tiny:production -> version 1 (was 2)" in rolled.stdout
    # A listing loads no model: no torch (1.4 s of the 3.3 s such a call took), no Ray.
    code = f"import sys; from jobs.promote import main; main({['--registry', root, '--model', 'tiny', '--list']!r})"
    code += "; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    listed_alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert listed_alone.stdout.splitlines()[-1] == "[]", listed_alone.stdout + listed_alone.stderr


def _download(uri: str, folder: Path) -> Path:
    path = folder / f"{hashlib.sha256(uri.encode()).hexdigest()[:8]}.safetensors"
    path.write_bytes(storage.read_bytes(uri))
    return path
