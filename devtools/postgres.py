"""A throw-away PostgreSQL 15 server (Debian `postgresql`) for tests and benchmarks, on a free loopback port.

The server refuses to run as root, so as root it runs as user `postgres` (runuser): its data directory is
chowned to that user, and the directories above it get the execute bit for others so it can reach it.
It listens on TCP 127.0.0.1 only (no Unix socket); every database it makes trusts local connections.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from devtools.ports import free_port
from devtools.tools import MissingToolError

RUN_AS = "postgres"


def _bin() -> Path:
    """Debian's server binaries (not on PATH): the newest /usr/lib/postgresql/<major>/bin (15 on Debian 12)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise MissingToolError("PostgreSQL's initdb is not installed (run scripts/install-system-deps.sh)")
    return found[-1].parent


def _pg_tool(name: str) -> str:
    return str(_bin() / name)


def _traversable(path: Path) -> None:
    """Give others the execute (search) bit on `path` and its parents, no read bit: `postgres` reaches its
    own directory below them and sees nothing else there."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class Postgres:
    """initdb + pg_ctl start on construction; `stop()` (also `start()` again: a database that goes down)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.data = self.work_dir / "pgdata"
        self.log = self.work_dir / "postgres.log"
        self.port = free_port()
        self._names = itertools.count(1)
        self._prefix = [] if os.geteuid() != 0 else [shutil.which("runuser") or "runuser", "-u", RUN_AS, "--"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.work_dir, user.pw_uid, user.pw_gid)
        self._run(_pg_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, *args: str) -> None:
        if os.geteuid() == 0:  # again each time: pytest resets its base temp dir to 0700 as the session ends
            _traversable(self.work_dir)
        done = subprocess.run([*self._prefix, *args], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
        self._run(
            _pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self) -> None:
        """Fast shutdown (open sessions are cut); a no-op when it is not running."""
        if (self.data / "postmaster.pid").exists():
            self._run(_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, *, upgraded: bool = True) -> str:
        """A fresh database, at grok-pacs' schema head unless `upgraded` is False; returns its URL."""
        import psycopg
        from sqlalchemy import create_engine

        from grok_pacs.store import schema

        name = f"grok_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if upgraded:
            engine = create_engine(self.url(name))
            schema.upgrade(engine)
            engine.dispose()
        return self.url(name)
