"""A simulated power cut: a process's file system calls, traced by strace, replayed into a model file system in
which only what was made durable survives a cut at any point of the trace.

    calls = read_trace(path)                 # strace -f -y -xx -s ... -o path (trace_command)
    replay = Replay(tree_of(root), root)     # the folder's state before the traced run, all of it durable
    events = replay.run(calls)               # every call that touched the folder, in order (checked: below)
    for cut, durable, volatile in replay.states(calls, {k: None, ...}):
        ...                                  # after calls[:cut]: what a power cut leaves, and what the process saw

The model is the strict one POSIX promises and no more (the ext4, XFS or btrfs of a given machine may keep more):
- a file's bytes survive as of its last fsync / fdatasync (a file never synced comes back empty); at a torn cut
  (a random.Random given for it), a file written since its last sync comes back as any of: that synced state, a
  prefix of what was written, or what was written with its tail zeroed (writeback that reached the disk in part);
- a name created, renamed or removed in a folder survives only once that folder was fsynced (its whole listing
  at that moment); a folder made by mkdir is in its parent's listing only once the parent was fsynced;
- sync() and syncfs() make everything durable.

Replaying is checked against the disk: `Replay.run(calls)` ends by comparing the model's last state with the
folder as the process left it, byte for byte, so a call the model missed or misread cannot pass unnoticed.
What the model cannot represent (a shared writable mmap of a file in the folder, hard links, O_TMPFILE, a
relative path given without a folder descriptor) raises Unsupported instead of being guessed.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CALLS = ("open,openat,openat2,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,ftruncate,truncate,fallocate,"
         "rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,fsync,fdatasync,sync,syncfs,close,"
         "close_range,dup,dup2,dup3,fcntl,link,linkat,symlink,symlinkat,mmap,copy_file_range,sendfile,clone,clone3,"
         "fork,vfork")
MAX_STRING = 1 << 26  # bytes strace prints of one write; a longer write is refused, not silently cut


class Unsupported(Exception):
    """A call the model cannot replay faithfully."""


def trace_command(argv: list[str], out: str | os.PathLike) -> list[str]:
    """`argv` run under strace, every file call of it and its children written to `out` with the data written,
    every string as hex escapes and every descriptor with its path."""
    if not shutil.which("strace"):
        raise Unsupported("strace is not installed (apt-get install -y strace)")
    return ["strace", "-f", "-qq", "-y", "-xx", "-s", str(MAX_STRING), "-e", f"trace={CALLS}", "-o", str(out), *argv]


def traced(argv: list[str], out: str | os.PathLike, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(trace_command(argv, out), **popen)


# ------------------------------------------------------------------------------------------------------ parsing
@dataclass
class Call:
    pid: int
    name: str
    args: list[str]
    ret: int | None
    ret_path: str | None = None


_HEX = r"(?:\\x[0-9a-f]{2})*"
_LINE = re.compile(r"^(\d+) +(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+= (.*)$", re.S)
_RET = re.compile(rf"^(-?\d+|0x[0-9a-f]+|\?)(?:<({_HEX})>)?")
_FD = re.compile(rf"^(-?\d+|AT_FDCWD)<({_HEX})>(\(deleted\))?$")
_STRING = re.compile(rf'"({_HEX})"(\.\.\.)?')


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def read_trace(path: str | os.PathLike) -> list[Call]:
    calls, pending = [], {}
    with open(path) as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            pid, text = int(m.group(1)), m.group(2)
            if text.startswith(("+++", "---")):
                continue
            if text.endswith("<unfinished ...>"):
                pending[pid] = text[: -len("<unfinished ...>")].rstrip()
                continue
            if text.startswith("<..."):
                head = pending.pop(pid, None)
                if head is None:
                    raise Unsupported(f"resumed call without its start: {text[:200]}")
                tail = text.split("resumed>", 1)[1]
                text = head + ("" if head.endswith("(") or tail.startswith((")", ",")) else " ") + tail
            call = _CALL.match(text)
            if not call:
                raise Unsupported(f"unparsed strace line: {text[:200]}")
            ret = _RET.match(call.group(3))
            value = ret.group(1)
            calls.append(Call(pid, call.group(1), split_args(call.group(2)),
                              None if value == "?" else int(value, 16 if value.startswith("0x") else 10),
                              os.fsdecode(unhex(ret.group(2))) if ret.group(2) is not None else None))
    return calls


def split_args(text: str) -> list[str]:
    """Top-level arguments: strings and paths hold only hex escapes, so brackets alone decide the nesting."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    if text.strip():
        args.append(text[start:].strip())
    return args


def fd_arg(arg: str) -> tuple[int | None, str | None]:
    """(descriptor, its path) of an argument printed as `3</path>`; AT_FDCWD gives None and the working folder."""
    m = _FD.match(arg)
    if not m:
        return (None if arg == "AT_FDCWD" else int(arg)), None
    path = os.fsdecode(unhex(m.group(2))) + (" (deleted)" if m.group(3) else "")
    return (None if m.group(1) == "AT_FDCWD" else int(m.group(1))), path


def data_arg(arg: str) -> bytes:
    """The bytes of a write's buffer, or of an iovec array's buffers in order."""
    out = b""
    for m in _STRING.finditer(arg):
        if m.group(2):
            raise Unsupported(f"a write longer than {MAX_STRING} bytes was cut short by strace")
        out += unhex(m.group(1))
    return out


def path_arg(arg: str) -> str:
    m = _STRING.fullmatch(arg)
    if not m:
        raise Unsupported(f"not a path: {arg[:100]}")
    return os.fsdecode(unhex(m.group(1)))


# ------------------------------------------------------------------------------------------------------- model
class Node:
    """A file (bytes written, bytes as of its last sync) or a folder (listing, listing as of its last sync)."""

    def __init__(self, folder: bool, data: bytes = b"", durable: bool = False):
        self.folder = folder
        self.data = bytearray(data)
        self.synced: bytes | None = bytes(data) if durable else None
        self.entries: dict[str, Node] = {}
        self.synced_entries: dict[str, Node] = {}

    def sync(self) -> None:
        if self.folder:
            self.synced_entries = dict(self.entries)
        else:
            self.synced = bytes(self.data)


@dataclass
class Handle:
    node: Node
    path: str
    pos: int = 0
    append: bool = False


@dataclass
class Event:
    """One call that touched the modelled folder: its index among all calls, kind and path."""
    index: int
    kind: str  # create, write, truncate, rename, unlink, mkdir, rmdir, fsync-file, fsync-folder, sync
    path: str
    to: str | None = None


@dataclass
class Replay:
    initial: dict  # {relative path: bytes, or None for a folder}: the folder's state before the traced run
    root: Path
    nodes: list = field(default_factory=list)

    def _build(self) -> Node:
        top = Node(True, durable=True)
        self.nodes = [top]
        for rel in sorted(self.initial, key=lambda r: r.count("/")):
            parent = self._lookup(top, os.path.dirname(rel)) if os.path.dirname(rel) else top
            node = Node(self.initial[rel] is None, self.initial[rel] or b"", durable=True)
            parent.entries[os.path.basename(rel)] = node
            self.nodes.append(node)
        for node in self.nodes:
            node.sync()
        return top

    def _rel(self, path: str | None) -> str | None:
        """`path` relative to the modelled folder, or None outside it."""
        if path is None:
            return None
        path = os.path.normpath(path)
        root = str(self.root)
        if path == root:
            return ""
        return path[len(root) + 1:] if path.startswith(root + "/") else None

    @staticmethod
    def _lookup(top: Node, rel: str) -> Node | None:
        node = top
        for part in rel.split("/") if rel else []:
            node = node.entries.get(part) if node.folder else None
            if node is None:
                return None
        return node

    def run(self, calls: list[Call]) -> list[Event]:
        """Replay every call; the events, once the last state was checked against the disk."""
        events = [e for e in self._replay(calls, cuts={})]
        mismatch = compare_trees(self.volatile_tree(), tree_of(self.root))
        if mismatch:
            raise Unsupported(f"the replay does not end in the state on disk: {mismatch}")
        return events

    def states(self, calls: list[Call], cuts: dict):
        """(cut, durable tree, volatile tree) after calls[:cut] for each cut of `cuts` ({cut: None, or the
        random.Random of a torn cut}), in increasing order."""
        for cut, torn in self._replay(calls, cuts):
            yield cut, self.durable_tree(torn), self.volatile_tree()

    def _replay(self, calls: list[Call], cuts: dict):
        self.top, self.tables, self.tgid = self._build(), {}, {}
        self.parents = {c.ret: (c.pid, "CLONE_THREAD" in (c.args[0] if c.name == "clone3" else
                                                             next((x for x in c.args if x.startswith("flags=")), "")))
                        for c in calls if c.name in ("clone", "clone3", "fork", "vfork") and c.ret and c.ret > 0}
        pending = sorted(cuts)
        for index, call in enumerate(calls):
            while pending and pending[0] <= index:
                cut = pending.pop(0)
                yield cut, cuts[cut]
            if call.ret is not None and call.ret < 0:
                continue  # failed: changed nothing
            for kind in self._apply(call) or ():
                if not cuts:
                    yield Event(index, *kind)
        for cut in pending:
            yield cut, cuts[cut]

    def _table(self, pid: int) -> dict:
        """The descriptor table of `pid`: its process's (a thread's is its process's; a forked child starts with
        its parent's, sharing offsets, as it shares the open files)."""
        if pid not in self.tgid:
            parent, thread = self.parents.get(pid, (None, False))
            if parent is not None and thread:
                self._table(parent)
                self.tgid[pid] = self.tgid[parent]
            else:
                self.tgid[pid] = pid
                self.tables[pid] = dict(self._table(parent)) if parent is not None else {}
        return self.tables[self.tgid[pid]]

    # one call -> its events ([(kind, path[, to])]) in the modelled folder, or none
    def _apply(self, call: Call) -> list[tuple] | None:
        name, a = call.name, call.args
        table = self._table(call.pid)
        if name in ("clone", "clone3", "fork", "vfork"):
            self._table(call.ret)  # a child that had not called anything yet gets its table as of now
            return None
        if name in ("open", "openat", "openat2", "creat"):
            return self._open(call, table)
        if name == "close":
            table.pop(fd_arg(a[0])[0], None)
            return None
        if name == "close_range":
            if "CLOSE_RANGE_CLOEXEC" in a[2]:  # marks them close-on-exec, closes nothing
                return None
            first, last = int(a[0]), int(a[1]) if a[1] != "~0U" else 1 << 31
            for fd in [fd for fd in table if first <= fd <= last]:
                del table[fd]
            return None
        if name in ("dup", "dup2", "dup3") or (name == "fcntl" and "F_DUPFD" in a[1]):
            old = table.get(fd_arg(a[0])[0])
            if old is not None:
                table[call.ret] = old
            else:
                table.pop(call.ret, None)
            return None
        if name in ("sync", "syncfs"):
            for node in self.nodes:
                node.sync()
            return [("sync", "")]
        if name in ("rename", "renameat", "renameat2"):
            old, new = (self._at(None, a[0]), self._at(None, a[1])) if name == "rename" else (
                self._at(a[0], a[1]), self._at(a[2], a[3]))
            if name == "renameat2" and "RENAME_EXCHANGE" in a[4]:
                raise Unsupported("renameat2 with RENAME_EXCHANGE")
            return self._rename(old, new)
        if name in ("unlink", "unlinkat", "rmdir"):
            path = self._at(None, a[0]) if name != "unlinkat" else self._at(a[0], a[1])
            return self._unlink(path, "rmdir" if name == "rmdir" or "AT_REMOVEDIR" in a[-1] else "unlink")
        if name in ("mkdir", "mkdirat"):
            return self._mkdir(self._at(None, a[0]) if name == "mkdir" else self._at(a[0], a[1]))
        if name in ("link", "linkat", "symlink", "symlinkat"):
            target = {"link": lambda: self._at(None, a[1]), "symlink": lambda: self._at(None, a[1]),
                      "linkat": lambda: self._at(a[2], a[3]), "symlinkat": lambda: self._at(a[1], a[2])}[name]()
            if self._rel(target) is not None:
                raise Unsupported(f"{name} into the modelled folder: {target}")
            return None
        if name == "truncate":
            path = self._at(None, a[0])
            rel = self._rel(path)
            if rel is None:
                return None
            node = self._lookup(self.top, rel)
            self._resize(node, int(a[1]))
            return [("truncate", rel)]
        fd, fd_path = fd_arg(a[0]) if a and not a[0].startswith("NULL") and name != "mmap" else (None, None)
        handle = table.get(fd)
        if name == "mmap":
            fd, fd_path = fd_arg(a[4])
            if table.get(fd) is not None and "PROT_WRITE" in a[2] and "MAP_SHARED" in a[3]:
                raise Unsupported(f"a shared writable mmap of {fd_path}")
            return None
        if handle is None:
            if fd_path is not None and self._rel(fd_path) is not None and not fd_path.endswith(" (deleted)") \
                    and name not in ("lseek", "fcntl"):
                raise Unsupported(f"{name} on {fd_path}, whose opening the trace does not show")
            if name in ("copy_file_range", "sendfile") and self._rel(fd_arg(a[0 if name == "sendfile" else 2])[1]):
                raise Unsupported(f"{name} into the modelled folder")
            return None
        return self._on_handle(name, a, call.ret, handle)

    def _at(self, dirfd: str | None, path_text: str) -> str:
        path = path_arg(path_text)
        if os.path.isabs(path):
            return path
        base = fd_arg(dirfd)[1] if dirfd is not None else None
        if base is None:
            raise Unsupported(f"a relative path without its folder: {path}")
        return os.path.join(base, path)

    def _open(self, call: Call, table: dict):
        flags = call.args[0] if call.name == "creat" else call.args[1 if call.name == "open" else 2]
        if call.name == "creat":
            flags = "O_CREAT|O_WRONLY|O_TRUNC"
        rel = self._rel(call.ret_path)
        if rel is None:
            table.pop(call.ret, None)
            return None
        if "O_TMPFILE" in flags:
            raise Unsupported(f"O_TMPFILE in {call.ret_path}")
        node, events = self._lookup(self.top, rel), []
        if node is None:
            parent = self._lookup(self.top, os.path.dirname(rel))
            if "O_CREAT" not in flags or parent is None:
                raise Unsupported(f"{call.ret_path} opened, but the model does not know it")
            node = parent.entries[os.path.basename(rel)] = Node(False)
            self.nodes.append(node)
            events.append(("create", rel))
        if "O_TRUNC" in flags and not node.folder and node.data:
            node.data.clear()
            events.append(("truncate", rel))
        table[call.ret] = Handle(node, rel, append="O_APPEND" in flags)
        return events

    def _on_handle(self, name: str, a: list[str], ret: int, handle: Handle):
        node = handle.node
        if name in ("write", "writev", "pwrite64", "pwritev", "pwritev2"):
            data = data_arg(a[1])[:ret]
            if name.startswith("p"):
                at = int(a[3])
            else:
                at = len(node.data) if handle.append else handle.pos
                handle.pos = at + len(data)
            if len(node.data) < at:
                node.data.extend(bytes(at - len(node.data)))
            node.data[at:at + len(data)] = data
            return [("write", handle.path)]
        if name == "lseek":
            handle.pos = ret
            return None
        if name in ("fsync", "fdatasync"):
            node.sync()
            return [("fsync-folder" if node.folder else "fsync-file", handle.path)]
        if name == "ftruncate":
            self._resize(node, int(a[1]))
            return [("truncate", handle.path)]
        if name == "fallocate":
            if "FALLOC_FL_KEEP_SIZE" not in a[1] and "PUNCH" not in a[1]:
                self._resize(node, max(len(node.data), int(a[2]) + int(a[3])))
                return [("truncate", handle.path)]
            if "PUNCH" in a[1]:
                raise Unsupported("fallocate punching a hole")
            return None
        if name in ("copy_file_range", "sendfile"):
            raise Unsupported(f"{name} into {handle.path}")
        return None

    @staticmethod
    def _resize(node: Node, size: int) -> None:
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))

    def _parent_and_name(self, path: str) -> tuple[Node | None, str, str | None]:
        rel = self._rel(path)
        if rel is None or rel == "":
            return None, "", rel
        return self._lookup(self.top, os.path.dirname(rel)), os.path.basename(rel), rel

    def _rename(self, old: str, new: str):
        old_parent, old_name, old_rel = self._parent_and_name(old)
        new_parent, new_name, new_rel = self._parent_and_name(new)
        if old_rel is None and new_rel is None:
            return None
        if old_parent is None or new_parent is None:
            raise Unsupported(f"rename across the modelled folder's edge: {old} -> {new}")
        if old_name not in old_parent.entries:
            raise Unsupported(f"{old} renamed, but the model does not know it")
        new_parent.entries[new_name] = old_parent.entries.pop(old_name)
        return [("rename", old_rel, new_rel)]

    def _unlink(self, path: str, kind: str):
        parent, name, rel = self._parent_and_name(path)
        if rel is None:
            return None
        if parent is None or name not in parent.entries:
            raise Unsupported(f"{path} removed, but the model does not know it")
        del parent.entries[name]
        return [(kind, rel)]

    def _mkdir(self, path: str):
        parent, name, rel = self._parent_and_name(path)
        if rel is None:
            return None
        if parent is None:
            raise Unsupported(f"{path} made in a folder the model does not know")
        node = parent.entries[name] = Node(True)
        self.nodes.append(node)
        return [("mkdir", rel)]

    # ------------------------------------------------------------------------------------------------- states
    def volatile_tree(self) -> dict:
        out = {}

        def walk(node: Node, rel: str) -> None:
            for name, child in node.entries.items():
                path = f"{rel}/{name}" if rel else name
                out[path] = None if child.folder else bytes(child.data)
                if child.folder:
                    walk(child, path)
        walk(self.top, "")
        return out

    def durable_tree(self, torn: random.Random | None = None) -> dict:
        out, seen = {}, set()

        def walk(node: Node, rel: str) -> None:
            if id(node) in seen:  # a folder renamed into itself's durable past: list it once
                return
            seen.add(id(node))
            for name, child in sorted(node.synced_entries.items()):
                path = f"{rel}/{name}" if rel else name
                out[path] = None if child.folder else after_cut(child, torn)
                if child.folder:
                    walk(child, path)
        walk(self.top, "")
        return out


def after_cut(node: Node, torn: random.Random | None) -> bytes:
    synced = node.synced if node.synced is not None else b""
    written = bytes(node.data)
    if torn is None or written == synced:
        return synced
    how = torn.randrange(3)
    if how == 0:
        return synced
    at = torn.randrange(len(written) + 1)
    return written[:at] if how == 1 else written[:at] + bytes(len(written) - at)


def tree_of(root: str | os.PathLike) -> dict:
    """{relative path: bytes, or None for a folder} of everything under `root` (symbolic links refused)."""
    root, out = Path(root), {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise Unsupported(f"a symbolic link in the modelled folder: {path}")
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def materialize(tree: dict, dest: str | os.PathLike) -> None:
    """Write `tree` as the folder `dest` (emptied first)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in sorted(tree, key=lambda r: r.count("/")):
        if tree[rel] is None:
            (dest / rel).mkdir(exist_ok=True)
        else:
            (dest / rel).write_bytes(tree[rel])


def compare_trees(a: dict, b: dict) -> str | None:
    """None when equal, else the first difference in words."""
    for rel in sorted(set(a) | set(b)):
        if rel not in a or rel not in b:
            return f"{rel} only in the {'model' if rel in a else 'disk'}"
        if a[rel] != b[rel]:
            kind = "folder" if None in (a[rel], b[rel]) else f"{len(a[rel])} vs {len(b[rel])} bytes"
            return f"{rel} differs ({kind})"
    return None
