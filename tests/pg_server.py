"""A throwaway PostgreSQL server on 127.0.0.1 for the tests, and a firewall rule that cuts it off.

Needs Debian's `postgresql` package (binaries under /usr/lib/postgresql/*/bin; .ci/run installs it) and
psycopg2-binary (the `postgres` and `dev` extras); callers skip with the reason otherwise. initdb refuses to run
as root, so as root the server runs as the `postgres` user in a temporary folder it owns.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.launch import free_port


def pg_bin() -> Path | None:
    """The newest PostgreSQL server binaries Debian's packages installed, if any."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if (Path(p).parent / "pg_ctl").is_file()]
    return max(found, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0)) if found else None


def as_user(user: str | None) -> dict:
    """subprocess arguments that run a command as `user` (None: as ourselves)."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": pw.pw_dir, "USER": user, "LOGNAME": user}}


class PgServer:
    """initdb + pg_ctl in a temporary folder; `setup` SQL runs as the superuser over the server's socket.

    password=False: every connection is trusted; True: TCP logins need a password (scram-sha-256)."""

    def __init__(self, prefix: str, password: bool = False):
        self.bin = pg_bin()
        if self.bin is None:
            pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                        "(apt-get install postgresql; .ci/run does)")
        self.psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
        self.user = None
        if os.geteuid() == 0:  # initdb refuses root
            try:
                self.user = pwd.getpwnam("postgres").pw_name
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user for initdb to run as")
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix=prefix))  # not under tmp_path: pytest's folders are root-only
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.port = free_port()
        self.running = False

    def start(self, *setup: str) -> PgServer:
        self.sock.mkdir()
        if self.user is not None:
            for p in (self.root, self.sock):
                shutil.chown(p, self.user, self.user)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256"] if self.password else ["-A", "trust"]
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", *auth, "-E", "UTF8",
                        "--locale=C", "--no-sync"], check=True, capture_output=True, timeout=120,
                       **as_user(self.user))
        self.pg_ctl("start")
        conn = self.psycopg2.connect(host=str(self.sock), port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in setup:
                cur.execute(sql)
        conn.close()
        return self

    def pg_ctl(self, action: str, mode: str = "fast") -> None:
        """start, stop or restart (mode fast: sessions are ended, as in a maintenance restart)."""
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"]
        cmd += ["-o", opts] if action != "stop" else []
        cmd += ["-m", mode] if action != "start" else []
        done = subprocess.run([*cmd, action], capture_output=True, text=True, timeout=90, **as_user(self.user))
        assert done.returncode == 0, done.stdout + done.stderr + (self.log.read_text() if self.log.exists() else "")
        self.running = action != "stop"

    @property
    def url(self) -> str:
        """The database `harness` as the superuser over TCP (a trusting server: no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/harness"

    def dump(self, db: str) -> list[str]:
        """The pg_dump command line for a database (as the superuser, over the socket)."""
        return [str(self.bin / "pg_dump"), "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", db]

    def close(self) -> None:
        if self.running:
            self.pg_ctl("stop", mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def database(prefix: str) -> Iterator[PgServer]:
    """A trusting server with an empty database `harness` (PgServer.url), stopped and removed afterwards."""
    pg = PgServer(prefix)
    try:
        yield pg.start("CREATE DATABASE harness")
    finally:
        pg.close()


class Firewall:
    """An nftables rule that silently drops every TCP packet to or from one port on the loopback: to clients
    the server vanishes without a word (new connections time out, open ones go half-open), as behind a failed
    switch. A table of its own, removed on exit; skipped with the reason where nft is missing or not allowed."""

    def __init__(self, port: int):
        self.port, self.table = port, f"harness_test_{port}"
        if shutil.which("nft") is None:
            pytest.skip("nft not found (apt-get install nftables; .ci/run does)")
        for step in (["add", "table", "inet", self.table], ["delete", "table", "inet", self.table]):
            probe = subprocess.run(["nft", *step], capture_output=True, text=True, timeout=30)
            if probe.returncode != 0:  # no CAP_NET_ADMIN, or a kernel without nf_tables
                pytest.skip(f"nft cannot change the firewall here: {probe.stderr.strip()[:200]}")

    def __enter__(self) -> Firewall:
        rules = (f"table inet {self.table} {{\n"
                 f" chain input {{ type filter hook input priority -100; policy accept;\n"
                 f"  iifname \"lo\" tcp dport {self.port} drop\n  iifname \"lo\" tcp sport {self.port} drop\n }}\n}}\n")
        done = subprocess.run(["nft", "-f", "-"], input=rules, text=True, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=30)
