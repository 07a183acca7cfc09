"""A throwaway PostgreSQL cluster for the tests: initdb, pg_ctl start, a database per test.

The cluster listens on a free loopback port (password auth, as a deployment would) and on
a unix socket in its own folder (trust, for the fixtures' own administration). PostgreSQL
refuses to run as root, so under root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "raresignal"
PASSWORD = "test-only-" + uuid.uuid4().hex


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's versioned folder."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(bindir) / "initdb").exists() and (Path(bindir) / "pg_ctl").exists():
            return Path(bindir)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running cluster and how to reach it."""

    bindir: Path
    root: Path
    port: int
    as_user: list[str]

    @property
    def socket_dir(self) -> str:
        return str(self.root / "socket")

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str) -> str:
        """The URL a server is given: TCP on loopback, no password in it."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = "rs_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bindir / args[0]), *args[1:]], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    def start(self) -> None:
        (self.root / "socket").mkdir()
        password_file = self.root / "pw"
        password_file.write_text(PASSWORD + "\n")
        if self.as_user:
            postgres = pwd.getpwnam("postgres")
            for path in (self.root, self.root / "socket", password_file):
                os.chown(path, postgres.pw_uid, postgres.pw_gid)
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={password_file}",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        # fsync off: a test cluster is thrown away, and its tests need no crash safety.
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.socket_dir} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w",
                      "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One cluster per test session (per xdist worker), stopped at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (make tools installs "
                    "them)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root, and there is no postgres user "
                        "to run it as (Debian's postgresql package creates one)")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not pytest's tmp_path: its folders are private to root, and the server is postgres.
    root = Path(tempfile.mkdtemp(prefix="raresignal-pg-"))
    cluster = Cluster(bindir, root, _free_port(), as_user)
    try:
        cluster.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_db(postgres_cluster: Cluster) -> Iterator[str]:
    """A fresh database of the cluster (its name), dropped after the test."""
    name = postgres_cluster.create_database()
    yield name
    postgres_cluster.drop_database(name)


@pytest.fixture
def password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cluster's password in a file, named by RARESIGNAL_DB_PASSWORD_FILE."""
    path = tmp_path / "db-password"
    path.write_text(PASSWORD + "\n")
    monkeypatch.setenv("RARESIGNAL_DB_PASSWORD_FILE", str(path))
    return path
