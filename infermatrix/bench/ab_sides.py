"""Where each side of an A/B run (bench/ab.py) runs its code: the side's source (a
folder, or a git ref checked out into a temporary worktree), its server process
(bench/ab_side.py, with the side's folder first on its path), and the one template
process from which every case process of both sides is forked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from infermatrix.bench.ab_side import PROTOCOL  # a side that speaks another version is refused
from infermatrix.errors import UserError

SIDES = ("base", "new")


@dataclass
class Side:
    name: str  # base | new
    given: str  # as the user wrote it
    root: Path  # the folder put first on the import path
    kind: str  # "infermatrix" | "plugin"
    commit: str | None = None  # the ref's commit, when given a ref
    worktree: Path | None = None  # ours to remove
    metadata: Path | None = None  # a plugin's entry points as package metadata, ours to remove
    repo: Path | None = None  # the git repository of the ref

    @property
    def label(self) -> str:
        return f"{self.given} ({self.commit[:12]})" if self.commit else self.given


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def _repo_root(repo: str | None) -> Path | None:
    out = _git(Path(repo or "."), "rev-parse", "--show-toplevel")
    return Path(out.stdout.strip()) if out.returncode == 0 else None


def _plugin_entry_points(folder: Path) -> tuple[str, dict[str, str]] | None:
    """(project name, {entry name: target}) of a pyproject.toml's infermatrix.variants group."""
    from infermatrix.bench.matrix import tomllib
    from infermatrix.variants import ENTRY_POINT_GROUP

    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{pyproject}: invalid TOML: {exc}") from None
    group = project.get("entry-points", {}).get(ENTRY_POINT_GROUP)
    return (project.get("name", folder.name), dict(group)) if group else None


def _identify(side: Side, folder: Path, scratch: Path) -> None:
    """Set the side's import root and kind, or refuse a folder that is neither."""
    for root in (folder, folder / "src"):
        if (root / "infermatrix" / "__init__.py").is_file():
            side.root, side.kind = root, "infermatrix"
            return
    plugin = _plugin_entry_points(folder)
    if plugin is None:
        raise UserError(f"{side.name.upper()} {side.given!r}: {folder} is not the package under test: it has no "
                        "infermatrix/__init__.py (infermatrix itself) and no "
                        "[project.entry-points.\"infermatrix.variants\"] in a pyproject.toml (a variant plugin)")
    name, entries = plugin
    side.root, side.kind = (folder / "src" if (folder / "src").is_dir() else folder), "plugin"
    # The side's entry points as package metadata, first on its path: importlib.metadata
    # takes the first distribution of a name, so they shadow an installed copy's.
    dist = scratch / f"{side.name}-metadata" / f"{name.replace('-', '_')}-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n", encoding="utf-8")
    lines = "".join(f"{key} = {value}\n" for key, value in entries.items())
    (dist / "entry_points.txt").write_text(f"[infermatrix.variants]\n{lines}", encoding="utf-8")
    side.metadata = dist.parent


def resolve_side(name: str, given: str, repo: str | None, scratch: Path) -> Side:
    """A source folder as it is, or a git ref checked out into a worktree under scratch."""
    side = Side(name, given, Path(), "")
    folder = Path(given)
    if folder.is_dir():
        _identify(side, folder.resolve(), scratch)
        return side
    root = _repo_root(repo)
    if root is None:
        raise UserError(f"{name.upper()} {given!r} is not a folder, and {Path(repo or '.').resolve()} is not in a "
                        "git repository to read it as a ref from; pass a folder, or --repo DIR")
    out = _git(root, "rev-parse", "--verify", "--quiet", f"{given}^{{commit}}")
    if out.returncode != 0:
        raise UserError(f"{name.upper()} {given!r} is neither a folder nor a git ref of {root} "
                        "(a branch, tag, commit or HEAD~1)")
    side.commit = out.stdout.strip()
    side.worktree = scratch / f"{name}-worktree"
    added = _git(root, "worktree", "add", "--detach", "--quiet", str(side.worktree), side.commit)
    if added.returncode != 0:
        side.worktree = None
        raise UserError(f"{name.upper()} {given!r}: git worktree add failed: {added.stderr.strip()}")
    side.repo = root
    try:
        _identify(side, side.worktree, scratch)
    except BaseException:
        remove_side(side)  # git's record of the worktree too, not only its folder
        raise
    return side


def remove_side(side: Side) -> None:
    if side.worktree is not None:
        _git(side.repo, "worktree", "remove", "--force", str(side.worktree))
        shutil.rmtree(side.worktree, ignore_errors=True)
        _git(side.repo, "worktree", "prune")
        side.worktree = None


_BOOT = """\
import os, sys
first = {first!r}
cwd = os.getcwd()
sys.path[:] = first + [p for p in sys.path if p not in ('', cwd) and p not in first]
from infermatrix.bench import ab_side
sys.exit(ab_side.main(sys.argv[1:]))
"""


class SideServer:
    """A side's server process and the connection to it."""

    def __init__(self, side: Side, spec: dict, log: Callable[[str], None]) -> None:
        self.side = side
        first = [str(p) for p in (side.metadata, side.root) if p is not None]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(first + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        ours, theirs = socket.socketpair()
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        boot = _BOOT.format(first=first)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, str(theirs.fileno()),
             json.dumps({**spec, "name": side.name, "root": str(side.root)})],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.log = log

    def receive(self, timeout: float) -> dict:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        words = self.last_words()
        if "ab_side" in words and "Error" in words:
            words = ("its infermatrix predates `infermatrix ab` (it has no infermatrix.bench.ab_side); "
                     "compare a version that has it, or gate two stored runs with `infermatrix gate`")
        raise UserError(f"{self.side.name.upper()} {self.side.label}: its side process "
                        f"{'stopped answering' if self.proc.returncode == -9 else 'exited'}: {words}")

    def request(self, message: dict, timeout: float) -> dict:
        try:
            self.conn.send(message)
        except OSError:
            pass  # receive() says why
        return self.receive(timeout)

    def last_words(self) -> str:
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def close(self) -> None:
        try:
            self.conn.send({"op": "quit"})
        except OSError:
            pass
        _end(self.proc)
        self.conn.close()
        self.stderr.close()


def _end(proc: subprocess.Popen) -> None:
    """Give a process that was told to stop 30 s to exit, then kill it."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_TEMPLATE = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's
sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]
import torch, torch._dynamo  # what every case process needs, imported once, from no side's folder
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
path, pythonpath = list(sys.path), os.environ.get('PYTHONPATH', '')
while True:
    try:
        job = conn.recv()
    except EOFError:
        break
    if job['op'] == 'reap':
        conn.send({'status': os.waitpid(job['pid'], 0)[1]})
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conn.close()
            # Shift this process's heap and mmap area by random amounts before anything
            # is allocated: where buffers land (4K aliasing, cache sets) can make an op
            # 1.6x faster, and a side's own import paths would fix that draw for all its
            # turns. Drawn anew per process, it is noise both sides share.
            import mmap
            draw = int.from_bytes(os.urandom(4), 'little')
            layout_pads = (bytearray(16 + draw % 65536), mmap.mmap(-1, (1 + (draw >> 16) % 64) * mmap.PAGESIZE))
            os.chdir(job['cwd'])
            sys.path[:] = job['paths'] + path
            os.environ['PYTHONPATH'] = os.pathsep.join(job['paths'] + ([pythonpath] if pythonpath else []))
            from infermatrix.bench import ab_side
            ab_side.case_main(job['socket'])
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    conn.send({'pid': pid})
"""


class Template:
    """The process every case process of both sides is forked from. It imports torch
    and nothing of either side; a forked child puts its side's folder first on its path
    and imports that side's code. What a child inherits from its parent is thereby the
    same for both sides: children of two different template processes ran the same
    attention op up to 1.8x apart here, children of one within 5%."""

    def __init__(self, scratch: Path) -> None:
        self.socket_path = str(scratch / "turns.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        try:
            self.listener.bind(self.socket_path)  # in our private scratch folder (mode 0700)
        except OSError as exc:
            self.listener.close()
            raise UserError(f"cannot listen on {self.socket_path} ({exc}); set TMPDIR to a shorter path") from None
        self.listener.listen(4)
        ours, theirs = socket.socketpair()
        self.output = tempfile.TemporaryFile()  # the template's and its children's output
        self.proc = subprocess.Popen([sys.executable, "-c", _TEMPLATE, str(theirs.fileno())], cwd=scratch,
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self.output,
                                     stderr=self.output)
        theirs.close()
        self.conn = Connection(ours.detach())

    def _ask(self, message: dict) -> dict:
        try:
            self.conn.send(message)
            if self.conn.poll(60):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        raise UserError(f"the A/B template process stopped: {self.last_line()}")

    def last_line(self) -> str:
        """The last line the template or a case process printed (a traceback's last line)."""
        self.output.seek(0, os.SEEK_END)
        self.output.seek(max(0, self.output.tell() - 4096))
        text = self.output.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def fork(self, side: Side, timeout: float) -> tuple[int, Connection | None]:
        """A case process of `side`, and its connection (None: it never called back)."""
        paths = [str(p) for p in (side.metadata, side.root) if p is not None]
        pid = self._ask({"op": "fork", "paths": paths, "cwd": os.getcwd(), "socket": self.socket_path})["pid"]
        self.listener.settimeout(0.5)
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and _alive(pid):  # a child that fails to start never calls
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            peer = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            if peer != pid:  # a child given up on earlier that called back late
                sock.close()
                continue
            sock.settimeout(None)
            return pid, Connection(sock.detach())
        return pid, None

    def reap(self, pid: int, kill: bool = False) -> str | None:
        """Wait for a case process to end; how it ended, when not cleanly."""
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = self._ask({"op": "reap", "pid": pid})["status"]
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            return f"case process crashed with {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        code = os.WEXITSTATUS(status)
        return None if code == 0 else f"case process exited with status {code} without a record"

    def close(self) -> None:
        self.conn.close()  # the template exits when its connection closes
        _end(self.proc)
        self.listener.close()
        self.output.close()


def _alive(pid: int) -> bool:
    """Whether a child of the template still runs (not ended, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def hello(server: SideServer, timeout: float) -> dict:
    """The side server's first message: its cases, environment and settings; or its error."""
    reply = server.receive(timeout)
    who = f"{server.side.name.upper()} {server.side.label}"
    if reply.get("op") == "error":
        raise UserError(f"{who}: {reply['error']}")
    if reply.get("op") != "hello" or reply.get("protocol") != PROTOCOL:
        raise UserError(f"{who}: its A/B side speaks protocol {reply.get('protocol')}, this driver {PROTOCOL}; "
                        "use the same infermatrix release on both sides")
    return reply
