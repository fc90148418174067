"""Releases and rollbacks on a migrated schema, with real server processes on
PostgreSQL: N-1 compatibility, and a rollout then a rollback under load.

"The previous release" is the code at the last commit on main whose
migrations differ from HEAD's (exported with `git archive`). While the project
has a single migration there is no such commit: the previous release is then
HEAD itself, and the schema one step ahead of it is HEAD's head plus a
synthetic test-only migration that adds a column and a table, which is what a
later release's expand step looks like.
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest
import sqlalchemy as sa
from alembic import command

from app.schema import HEAD
from tests.conftest import ROOT, alembic_config, migrate
from tests.live_server import LiveServer

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}
SYNTHETIC = "zz_synthetic_expand"

SYNTHETIC_MIGRATION = '''"""test only: what a later release's expand step looks like"""
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("nickname", sa.String(64), nullable=True))
    op.create_table("synthetic_audit", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("note", sa.Text, nullable=True))


def downgrade():
    op.drop_table("synthetic_audit")
    op.drop_column("users", "nickname")
'''


def migrate_one_ahead(url: str, scratch: Path) -> None:
    """Upgrade to HEAD's head plus the synthetic revision."""
    versions = scratch / "synthetic_versions"
    versions.mkdir(exist_ok=True)
    (versions / f"{SYNTHETIC}.py").write_text(
        SYNTHETIC_MIGRATION.format(revision=SYNTHETIC, down=HEAD))
    config = alembic_config(url)
    config.set_main_option(
        "version_locations", f"{ROOT / 'migrations' / 'versions'}:{versions}")
    command.upgrade(config, SYNTHETIC)


def previous_release(scratch: Path) -> Path | None:
    """The last commit on main whose migrations differ from HEAD's, exported;
    None while there is no such commit (one migration so far)."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True).stdout

    try:
        changed = git("rev-list", "-1", "HEAD", "--", "migrations/versions").decode().strip()
        parent = git("rev-list", "--parents", "-n", "1", changed).decode().split()[1:]
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    if not parent:
        return None  # the migrations were born in the first commit
    target = scratch / "previous"
    archive = git("archive", "--format=tar", parent[0])
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def exercise(live: LiveServer, name: str) -> None:
    """Reads, writes and readiness all work."""
    with httpx.Client(base_url=live.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        put = client.put(f"/hello/{name}", headers=JSON,
                         content=json.dumps({"dateOfBirth": "1990-05-17"}))
        assert put.status_code == 204, put.text
        get = client.get(f"/hello/{name}")
        assert get.status_code == 200 and get.json()["message"].startswith(f"Hello, {name}!")
        assert client.delete(f"/hello/{name}").status_code == 204


def test_the_previous_release_serves_on_the_current_schema(postgres_server, tmp_path):
    url = postgres_server.create_database()
    migrate(url)
    previous = previous_release(tmp_path)
    if previous is None:
        # One migration so far: HEAD plays the previous release, one step behind.
        migrate_one_ahead(url, tmp_path)
    with LiveServer(url, cwd=previous or ROOT) as live:
        exercise(live, "Previous")


def test_the_current_release_serves_on_a_schema_one_migration_ahead(postgres_server, tmp_path):
    url = postgres_server.create_database()
    migrate(url)
    migrate_one_ahead(url, tmp_path)
    with LiveServer(url) as live:
        exercise(live, "Current")
        # The later release's column is there; this release never touches it.
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as connection:
            assert connection.execute(sa.text(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_name = 'users' AND column_name = 'nickname'")).scalar() == 1
        engine.dispose()


@dataclass
class Balancer:
    """A load balancer as Kubernetes and Cloud Run run one: a backend gets
    traffic while its /readyz answers 200, checked every 100 ms."""

    backends: list[LiveServer] = field(default_factory=list)
    healthy: list[LiveServer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        with httpx.Client(timeout=1) as client:
            while not self.stop.is_set():
                healthy = []
                for backend in list(self.backends):
                    try:
                        if client.get(backend.url + "/readyz").status_code == 200:
                            healthy.append(backend)
                    except httpx.TransportError:
                        pass
                self.healthy = healthy
                time.sleep(0.1)


@dataclass
class Load:
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str | None, elapsed: float) -> None:
        with self.lock:
            self.sent += 1
            self.slowest = max(self.slowest, elapsed)
            if outcome:
                self.failures.append(outcome)


def drive(balancer: Balancer, load: Load, worker: int) -> None:
    turn = itertools.count()
    clients: dict[str, httpx.Client] = {}
    name = f"Load{chr(65 + worker)}"
    while not balancer.stop.is_set():
        healthy = balancer.healthy
        if not healthy:
            time.sleep(0.01)
            continue
        n = next(turn)
        backend = healthy[n % len(healthy)]
        client = clients.setdefault(backend.url, httpx.Client(base_url=backend.url, timeout=10))
        started = time.monotonic()
        try:
            if n % 3 == 0:
                response = client.put(f"/hello/{name}", headers=JSON,
                                      content=json.dumps({"dateOfBirth": "1991-07-08"}))
                ok = response.status_code == 204
            else:
                response = client.get(f"/hello/{name}")
                ok = response.status_code in (200, 404)
            outcome = None if ok else f"{response.status_code} from {backend.url}"
        except httpx.TransportError as error:
            outcome = f"{type(error).__name__} from {backend.url}"
        load.record(outcome, time.monotonic() - started)
    for client in clients.values():
        client.close()


def test_rollout_then_rollback_under_load_loses_no_request(postgres_server, tmp_path):
    url = postgres_server.create_database()
    migrate(url)
    old_code = previous_release(tmp_path) or ROOT
    drain = {"SHUTDOWN_DRAIN_SECONDS": "1.5"}
    balancer, load = Balancer(), Load()
    reached_ready: list[str] = []

    def start(cwd: Path, label: str) -> LiveServer:
        live = LiveServer(url, cwd=cwd, **drain).start()  # start() waits for /readyz 200
        reached_ready.append(label)
        balancer.backends.append(live)
        return live

    def retire(live: LiveServer) -> int:
        live.terminate()  # SIGTERM: /readyz 503 at once, serves through the drain
        code = live.wait(timeout=30)
        balancer.backends.remove(live)
        return code

    old = start(old_code, "old")
    threads = [threading.Thread(target=balancer.watch, daemon=True)]
    threads += [threading.Thread(target=drive, args=(balancer, load, i), daemon=True)
                for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)
        migrate_one_ahead(url, tmp_path)           # the new release's migration job
        time.sleep(1)                              # the old release serves on it
        new = start(ROOT, "new")                   # the new release's pod
        time.sleep(1)
        exit_codes = [retire(old)]                 # the old pod goes
        time.sleep(1)
        rolled_back = start(old_code, "rollback")  # roll back: old code, newer schema
        time.sleep(1)
        exit_codes.append(retire(new))
        time.sleep(1)
        exit_codes.append(retire(rolled_back))
    finally:
        balancer.stop.set()
        for thread in threads:
            thread.join(timeout=15)
        for live in list(balancer.backends):
            live.stop()
    figures = (f"requests sent {load.sent}, failed {len(load.failures)}, "
               f"longest answer {load.slowest * 1000:.0f} ms")
    print(f"\nrollout and rollback: {figures}")
    Path(ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "rollout-figures.txt").write_text(figures + "\n")
    assert reached_ready == ["old", "new", "rollback"]
    assert exit_codes == [0, 0, 0]
    assert load.sent > 200, figures
    assert load.failures == [], f"{figures}: {load.failures[:10]}"
