"""A real PostgreSQL server for the export tests: Debian's binaries (PostgreSQL 15, with PostGIS when installed),
a data directory in a temporary folder, listening on 127.0.0.1 on a free port and on a unix socket in that
folder, stopped afterwards. initdb refuses root: as root the server runs as the `postgres` user (or `nobody`)."""
from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner() -> tuple[list[str], str]:
    """(command prefix, user name) to run the server's programs as: as root another user, else oneself."""
    if os.geteuid() != 0:
        return [], getpass.getuser()
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], user
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run the server as")


def why_not() -> str | None:
    """Why no server can be started here (None: it can)."""
    if not (BIN / "initdb").exists():
        return f"no PostgreSQL 15 server binaries at {BIN} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'duch[export]')"
    return None


@contextlib.contextmanager
def server():
    """`with server() as url:` a fresh cluster, its database `duch` reached at url (postgresql://...)."""
    prefix, user = _runner()
    root = Path(tempfile.mkdtemp(prefix="duch-pg-"))
    data = root / "data"
    os.chmod(root, 0o755)
    if prefix:
        shutil.chown(root, user)
    port = _free_port()
    run = lambda *args: subprocess.run([*prefix, *map(str, args)], check=True, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    try:
        run(BIN / "initdb", "-D", data, "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        run(BIN / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    except subprocess.CalledProcessError as e:
        log = (root / "log").read_text()[-2000:] if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"the test server did not start: {e.stderr or e.stdout} {log}") from None
    try:
        run(BIN / "createdb", "-h", root, "-p", port, "-U", user, "duch")
        yield f"postgresql://{user}@127.0.0.1:{port}/duch"
    finally:
        subprocess.run([*prefix, str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def free_port_url(password: str):
    """(url, host, port) of a database where nothing listens: a port taken and closed again."""
    port = _free_port()
    yield f"postgresql://duch:{password}@127.0.0.1:{port}/duch", "127.0.0.1", port
