"""Write a small git repository directly (one pack, refs, index): no git process at all.

Generating a toy task with the git command line costs six processes (init, add, commit, add, commit,
rev-parse), ~30 ms unloaded and several times that on a busy build machine, and loose objects cost
two file-system operations each; this writes all objects into one pack (a .pack and its .idx), so a
repository is its work tree plus about ten files. The result is what `git init` + `git add` +
`git commit` would give (regular files, mode 100644, one branch), then `git gc`; object ids depend
only on the contents, messages, author and dates, so they are reproducible.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["write_repo"]


_KINDS = {b"commit": 1, b"tree": 2, b"blob": 3}


class _Objects:
    """The objects of one repository, written as a single version-2 pack."""

    def __init__(self) -> None:
        self.objects: dict[bytes, tuple[bytes, bytes]] = {}  # sha -> (kind, data)

    def add(self, kind: bytes, data: bytes) -> bytes:
        sha = hashlib.sha1(kind + b" " + str(len(data)).encode() + b"\0" + data).digest()
        self.objects.setdefault(sha, (kind, data))
        return sha

    def write_pack(self, git_dir: Path) -> None:
        shas = sorted(self.objects)
        pack = [b"PACK", struct.pack(">II", 2, len(shas))]
        offsets, crcs, offset = [], [], 12
        for sha in shas:
            kind, data = self.objects[sha]
            size = len(data)
            header = bytearray([(_KINDS[kind] << 4) | (size & 0x0F)])
            size >>= 4
            while size:
                header[-1] |= 0x80
                header.append(size & 0x7F)
                size >>= 7
            entry = bytes(header) + zlib.compress(data, 1)
            pack.append(entry)
            offsets.append(offset)
            crcs.append(zlib.crc32(entry))
            offset += len(entry)
        pack_data = b"".join(pack)
        pack_sha = hashlib.sha1(pack_data).digest()
        fanout = [0] * 256
        for sha in shas:
            fanout[sha[0]] += 1
        for i in range(1, 256):
            fanout[i] += fanout[i - 1]
        idx = b"".join([b"\xfftOc", struct.pack(">I", 2), struct.pack(">256I", *fanout), *shas,
                        struct.pack(f">{len(shas)}I", *crcs), struct.pack(f">{len(shas)}I", *offsets), pack_sha])
        idx += hashlib.sha1(idx).digest()
        name = git_dir / "objects" / "pack" / f"pack-{pack_sha.hex()}"
        name.with_suffix(".pack").write_bytes(pack_data + pack_sha)
        name.with_suffix(".idx").write_bytes(idx)


def _tree(objects: _Objects, files: Mapping[str, bytes]) -> bytes:
    """Write the tree of `files` (path -> blob sha) and its subtrees; returns its sha."""
    entries: dict[str, tuple[bytes, bytes]] = {}  # name -> (mode, sha)
    subdirs: dict[str, dict[str, bytes]] = {}
    for path, sha in files.items():
        head, sep, rest = path.partition("/")
        if sep:
            subdirs.setdefault(head, {})[rest] = sha
        else:
            entries[head] = (b"100644", sha)
    for name, sub in subdirs.items():
        entries[name] = (b"40000", _tree(objects, sub))
    # git orders tree entries by name, a directory's name compared as if it ended in "/"
    order = sorted(entries, key=lambda n: (n + "/" if entries[n][0] == b"40000" else n).encode())
    data = b"".join(entries[n][0] + b" " + n.encode() + b"\0" + entries[n][1] for n in order)
    return objects.add(b"tree", data)


def _index(repo: Path, files: Mapping[str, bytes]) -> bytes:
    """An index (version 2) for `files` as they are on disk now."""
    body = [b"DIRC", struct.pack(">II", 2, len(files))]
    for path in sorted(files, key=str.encode):
        st = os.stat(repo / path)
        name = path.encode()
        entry = struct.pack(
            ">10I", int(st.st_ctime) & 0xFFFFFFFF, st.st_ctime_ns % 1_000_000_000,
            int(st.st_mtime) & 0xFFFFFFFF, st.st_mtime_ns % 1_000_000_000,
            st.st_dev & 0xFFFFFFFF, st.st_ino & 0xFFFFFFFF, 0o100644,
            st.st_uid & 0xFFFFFFFF, st.st_gid & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF,
        ) + files[path] + struct.pack(">H", min(len(name), 0xFFF)) + name
        body.append(entry + b"\0" * (8 - len(entry) % 8))  # NUL-terminated, padded to 8 bytes
    data = b"".join(body)
    return data + hashlib.sha1(data).digest()


def write_repo(repo: Path, commits: Sequence[tuple[str, str, Mapping[str, str]]], *,
               author: tuple[str, str], branch: str = "main") -> str:
    """Create `repo` with one commit per (message, ISO date, files added or changed); return HEAD.

    Each commit's tree is every file written so far. Files are written to the work tree too, and
    the index matches HEAD, so the repository looks like a fresh clone.
    """
    git_dir = repo / ".git"
    for sub in ("objects/pack", "refs/heads", "refs/tags"):
        (git_dir / sub).mkdir(parents=True)
    (git_dir / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    (git_dir / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n"
                                    "\tbare = false\n\tlogallrefupdates = true\n")
    objects = _Objects()
    blobs: dict[str, bytes] = {}
    parent: str | None = None
    who = f"{author[0]} <{author[1]}>"
    for message, date, files in commits:
        for path, text in files.items():
            data = text.encode("utf-8")
            target = repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            blobs[path] = objects.add(b"blob", data)
        stamp = f"{int(dt.datetime.fromisoformat(date).timestamp())} +0000"
        lines = [f"tree {_tree(objects, blobs).hex()}"]
        if parent is not None:
            lines.append(f"parent {parent}")
        lines += [f"author {who} {stamp}", f"committer {who} {stamp}", "", message.rstrip("\n"), ""]
        parent = objects.add(b"commit", "\n".join(lines).encode()).hex()
    if parent is None:
        raise ValueError("commits: at least one commit is needed")
    objects.write_pack(git_dir)
    (git_dir / "refs" / "heads" / branch).write_text(parent + "\n")
    (git_dir / "index").write_bytes(_index(repo, blobs))
    return parent
