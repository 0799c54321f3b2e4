"""The mount thread: one thread that owns a private mount namespace holding every sandbox mount.

A thread may leave its process's mount namespace: unshare(CLONE_FS) gives it its own root and cwd,
after which unshare(CLONE_NEWNS) is allowed. Every overlay, tmpfs and bind that sandboxd makes is
made in this namespace, so:

- the host's mount table never sees them (nothing to leak, nothing for other tools to trip on);
- when the daemon process dies for any reason, the kernel drops the namespace and every mount in
  it: a crash leaks no mount, and startup has nothing to clean;
- processes spawned from this thread (the zygote) start in this namespace, and the thread's cwd
  is the state directory, so overlay options use short relative paths.

Jobs run one at a time in submission order. Background jobs (unmounting an old root or upper,
preparing a spare one, collecting a layer) run in submission order on a second thread that has
joined the same namespace (setns), so that they never sit in front of a restore: unmounting a
tmpfs frees its pages there, which takes milliseconds for a large upper.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

import outcome
import trio

from sandboxd import linux

__all__ = ["MountThread"]

log = logging.getLogger(__name__)

_STOP = object()


class MountThread:
    def __init__(self, cwd: str, name: str = "sandboxd-mounts") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._background: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self.background_errors: list[str] = []  # bounded: the last 100
        self.tid = 0
        self._thread = threading.Thread(target=self._main, args=(cwd,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is None:
            self._ready.clear()
            self._bg_thread = threading.Thread(target=self._background_main, args=(cwd,),
                                               name=f"{name}-bg", daemon=True)
            self._bg_thread.start()
            self._ready.wait()
        if self._start_error is not None:
            if self.tid:
                self._jobs.put(_STOP)
                self._thread.join()
            raise self._start_error

    def _main(self, cwd: str) -> None:
        try:
            linux.unshare(linux.CLONE_FS)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            os.chdir(cwd)
            self.tid = threading.get_native_id()
        except BaseException as exc:  # reported to the constructor's caller
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, done = job
            done(outcome.capture(fn, *args))

    def _background_main(self, cwd: str) -> None:
        try:
            ns = os.open(f"/proc/self/task/{self.tid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.unshare(linux.CLONE_FS)
                linux.setns(ns, linux.CLONE_NEWNS)
            finally:
                os.close(ns)
            os.chdir(cwd)
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._background.get()
            try:
                if job is _STOP:
                    return
                fn, args = job
                if not self._closed:  # closing: the namespace takes every mount with it
                    fn(*args)
            except Exception as exc:
                name = getattr(fn, "__name__", repr(fn))
                log.warning("sandboxd background job %s failed: %s", name, exc)
                self.background_errors = [*self.background_errors[-99:], f"{name}: {exc}"]
            finally:
                self._background.task_done()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the mount thread and return its result (or raise its exception).

        Not cancellable once submitted: a mount sequence is never abandoned half-way.
        """
        if self._closed:
            raise RuntimeError("mount thread is closed")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((fn, args, done))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking variant of run() for code outside trio (cleanup paths)."""
        if self._closed:
            raise RuntimeError("mount thread is closed")
        box: list[outcome.Outcome] = []
        event = threading.Event()

        def done(result: outcome.Outcome) -> None:
            box.append(result)
            event.set()

        self._jobs.put((fn, args, done))
        event.wait()
        return box[0].unwrap()

    def background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) for the background thread; failures are logged and kept."""
        if not self._closed:
            self._background.put((fn, args))

    def drain_background(self) -> None:
        """Block until every queued background job has run (tests, shutdown)."""
        self._background.join()

    def close(self) -> None:
        """Stop the threads; the namespace, and every mount in it, goes with them."""
        if self._closed:
            return
        self._closed = True
        self._background.put(_STOP)
        self._bg_thread.join()
        self._jobs.put(_STOP)
        self._thread.join()
