"""A throwaway PostgreSQL server of our own, for tests that stop and restart the database.

Restarting the shared cluster (``pg_ctlcluster 15 main restart``) would cut
every other test and process using it, so the outage tests run their own
server: ``initdb`` into a temporary folder, ``pg_ctl`` on a free port, with
the installed PostgreSQL's binaries (the newest version under
``/usr/lib/postgresql``). Run as root, the server runs as the ``postgres``
user (PostgreSQL refuses root). fsync stays on: durability is what is tested.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.flywheel_process import free_port

__all__ = ["PrivatePostgres"]


class PrivatePostgres:
    """``start()``, ``stop()``, ``restart()``, ``url``; ``close()`` removes everything."""

    def __init__(self) -> None:
        self.bin = self.binaries()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            self.root.chmod(0o755)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run(
            self.bin / "initdb",
            "-D",
            str(self.data),
            "-U",
            "flywheel",
            "--auth=trust",
            "--no-sync",  # only the bootstrap; the server itself fsyncs
            "-E",
            "UTF8",
        )

    @staticmethod
    def binaries() -> Path:
        versions = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
            key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        )
        if not versions:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        return versions[-1].parent

    @property
    def url(self) -> str:
        return f"postgresql://flywheel@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: object) -> None:
        args = [str(a) for a in argv]
        if self._as_postgres:
            args = ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(args, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args} failed: {done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown: sessions are terminated, as in a real restart or failover."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
