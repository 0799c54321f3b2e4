"""The file and diff calls of a sandbox, written once for every runtime (`ns`, `podman`, `dir`).

A runtime inherits `FileCalls` and provides three things:

- ``_sandbox(sandbox_id)``: the sandbox record (NotFound for an unknown id); it has ``.workdir``;
- ``_with_root(sb, fn, *args)``: runs ``fn(root_fd, *args)`` (a blocking `sandboxd.files` function) in
  a worker thread with a descriptor of the sandbox's root, under the sandbox's lock;
- ``exec(sandbox_id, argv, ...)``: the diff runs ``git`` inside the sandbox.

The checks (sizes, modes, paths) and the error codes are therefore the same on every runtime.
"""

from __future__ import annotations

from typing import Any

from sandboxd import files
from sandboxd.checks import check_size, check_write
from sandboxd.execs import MAX_OUTPUT_BYTES, git_diff_command, git_diff_result

__all__ = ["MAX_FILE_BYTES", "FileCalls"]

MAX_FILE_BYTES = 64 << 20  # one read_file / write_file / stdin


class FileCalls:
    def _sandbox(self, sandbox_id: object) -> Any:
        raise NotImplementedError

    async def _with_root(self, sb: Any, fn: Any, *args: Any) -> Any:
        raise NotImplementedError

    async def exec(self, sandbox_id: str, argv: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        sb = self._sandbox(sandbox_id)
        max_bytes = check_size(max_bytes, "max_bytes", MAX_FILE_BYTES)
        return await self._with_root(sb, files.read_file, path, sb.workdir, max_bytes)

    async def write_file(self, sandbox_id: str, path: str, data: bytes, *, mode: int = 0o644,
                         parents: bool = True) -> None:
        sb = self._sandbox(sandbox_id)
        check_write(data, mode, MAX_FILE_BYTES)
        await self._with_root(sb, files.write_file, path, sb.workdir, bytes(data), mode, bool(parents))

    async def list_dir(self, sandbox_id: str, path: str = ".", *, max_entries: int = 10000
                       ) -> tuple[list[files.DirEntry], bool]:
        """Entries sorted by name, and whether there were more than max_entries."""
        sb = self._sandbox(sandbox_id)
        max_entries = check_size(max_entries, "max_entries", 1_000_000)
        return await self._with_root(sb, files.list_dir, path, sb.workdir, max_entries)

    async def diff(self, sandbox_id: str, base_commit: str, *, timeout_s: float = 120.0) -> str:
        """`git diff` of the repository at workdir against base_commit, untracked files included
        (the model's patch). The repository's own index is left untouched."""
        sb = self._sandbox(sandbox_id)
        argv, env = git_diff_command(base_commit)
        res = await self.exec(sb.id, argv, timeout_s=timeout_s, env=env, max_output_bytes=MAX_OUTPUT_BYTES)
        return git_diff_result(res, base_commit)
