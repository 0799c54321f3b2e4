"""Reset cost on a real Python project: the ns runtime against a plain copy and podman, in one run.

The project is Django 5.1.4 from its PyPI sdist (6,809 files), committed to git, with its
dependencies (asgiref, sqlparse: `pip install --target`) in the sandbox at /opt/deps (outside the
repository, so `git clean -fdx` keeps them) and PYTHONPATH pointing there. Downloaded once into
a cache directory ($SANDBOXD_BENCH_CACHE, default ~/.cache/sandboxd-bench).

Each round dirties the sandbox (a tracked file changed, a package directory deleted, untracked
and ignored files made by importing django, a setsid'd SIGTERM-ignoring process left running),
then resets it, then checks the reset (outside the timing) and asserts that it held:

    ns_restore        NsRuntime.restore(sid, snapshot); _ready: + the first exec (`true`) after it
    ns_fork           NsRuntime.fork(snapshot): a new sandbox on the snapshot's layers
    dir_restore       DirRuntime.restore (sandboxd/dirrt.py): a copy of the snapshot directory
    podman_recreate   PodmanRuntime.restore (sandboxd/podman.py): a new container from the
                      snapshot's image (`podman_recreate` below)
    podman_git_reset  `git reset --hard && git clean -fdx` through PodmanRuntime.exec
                      (`podman_git_reset` below): files only, the stray process survives

Checks: no process but the sandbox's own init (ns, podman) is left, `git status --porcelain
--ignored` is empty and HEAD is the base commit (all), django imports with its dependencies
(ns, first and last round). The dir runtime has no process isolation to check, git_reset does
not kill processes by design. Peers that cannot run here are listed in `skipped`, with why.
Needs root and overlayfs. Usage: python bench/sandbox_reset.py [--rounds 200]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import Limits, open_ns_runtime  # noqa: E402

PROJECT, VERSION = "Django", "5.1.4"
DEPS = ("asgiref>=3.8.1,<4", "sqlparse>=0.3.1")
MIN_FILES = 5000
LIMITS = Limits(memory_bytes=2 << 30, pids=512, disk_bytes=512 << 20)
ENV = {"PYTHONPATH": "/opt/deps", "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
       "GIT_CONFIG_VALUE_0": "*"}
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
# $HOME/../opt/deps is /opt/deps in ns and podman sandboxes, and <sandbox dir>/opt/deps in dir ones.
DEPS_PATH = 'PYTHONPATH="$HOME/../opt/deps" '
DIRTY = ("echo '# changed' >> django/__init__.py && rm -rf django/contrib/admin && mkdir -p new/pkg && "
         "echo x > new/pkg/mod.py && " + DEPS_PATH + "python3 -c 'import django.db' && "
         "(setsid sh -c 'trap \"\" TERM HUP; sleep 1000' </dev/null >/dev/null 2>&1 &) && echo dirty")
# Every process but init (pid 1) and this shell; git's view of the work tree, then HEAD.
PROCESS_CHECK = ('for p in /proc/[0-9]*; do n=${p#/proc/}; [ "$n" = 1 ] || [ "$n" = $$ ] || '
                 'echo "proc $n $(tr "\\0" " " < $p/cmdline 2>/dev/null)"; done; ')
GIT_CHECK = "git status --porcelain --ignored --untracked-files=all | head -5; git rev-parse HEAD"
IMPORT_CHECK = DEPS_PATH + "python3 -B -c 'import django, asgiref, sqlparse; print(django.__version__, django.__file__)'"
PODMAN_KEEPER = "sleep 2147483647 "  # the podman runtime's container main process


# ---------------------------------------------------------------- the project


def prepare_project(cache: str) -> tuple[str, str, str]:
    """(repository, base commit, dependencies directory), made once in `cache`."""
    os.makedirs(cache, exist_ok=True)
    repo = os.path.join(cache, f"{PROJECT.lower()}-{VERSION}")
    deps = os.path.join(cache, f"deps-{PROJECT.lower()}-{VERSION}")
    if not os.path.isdir(os.path.join(repo, ".git")):
        sdist = os.path.join(cache, f"{PROJECT}-{VERSION}.tar.gz")
        if not os.path.exists(sdist):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"{PROJECT.lower()}=={VERSION}", "-d", cache], check=True, capture_output=True)
        tmp = repo + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tar:  # owned by root, as a checkout would be (git refuses others')
            tar.extractall(tmp, filter=lambda m, path: tarfile.tar_filter(m, path).replace(
                uid=0, gid=0, uname="root", gname="root"))
        env = {**os.environ, **GIT_ENV}
        src = os.path.join(tmp, f"{PROJECT}-{VERSION}")
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"{PROJECT} {VERSION}"]):
            subprocess.run(["git", *args], cwd=src, env=env, check=True)
        os.rename(src, repo)
        shutil.rmtree(tmp)
    if not os.path.isdir(deps):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target",
                        deps + ".tmp", *DEPS], check=True, capture_output=True)
        os.rename(deps + ".tmp", deps)
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    return repo, base, deps


def count_files(repo: str) -> int:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return out.count(b"\0")


async def install_deps(rt, sid: str, deps: str) -> None:
    """The dependencies, into the sandbox at /opt/deps (the image part of this task)."""
    for dirpath, _, names in os.walk(deps):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, deps)
            with open(path, "rb") as f:
                await rt.write_file(sid, f"/opt/deps/{rel}", f.read(), mode=os.stat(path).st_mode & 0o777)


# ---------------------------------------------------------------- checks


async def dirty(rt, sid: str) -> None:
    res = await rt.exec(sid, DIRTY, timeout_s=60)
    assert res.output.endswith(b"dirty\n"), res.output[-500:]


async def check_reset(rt, sid: str, base: str, *, processes: bool, allowed: tuple[str, ...] = ()) -> None:
    """Assert that the sandbox is back at the base commit, clean, and (if `processes`) that no
    process is left but init and the allowed ones."""
    res = await rt.exec(sid, (PROCESS_CHECK if processes else "") + GIT_CHECK, timeout_s=60)
    lines = res.output.decode(errors="replace").splitlines()
    assert lines and lines[-1] == base, f"HEAD is not the base commit: {res.output[-800:]!r}"
    strays = [ln for ln in lines[:-1] if ln.startswith("proc ") and not ln.split(" ", 2)[2].startswith(allowed)]
    dirt = [ln for ln in lines[:-1] if not ln.startswith("proc ")]
    assert not dirt, f"the work tree is not clean: {dirt}"
    if processes:
        assert not strays, f"processes survived the reset: {strays}"


async def check_imports(rt, sid: str) -> None:
    res = await rt.exec(sid, IMPORT_CHECK, timeout_s=60)
    assert res.exit_code == 0 and res.output.startswith(VERSION.encode()), res.output[-800:]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3)


# ---------------------------------------------------------------- the peers


async def measure_ns(work: str, repo: str, base: str, deps: str, rounds: int) -> dict[str, list[float]]:
    restore, ready, fork = [], [], []
    async with open_ns_runtime(os.path.join(work, "ns"), limits=LIMITS) as rt:
        sid = await rt.create("host", repo=repo, env=ENV)
        await install_deps(rt, sid, deps)
        await check_imports(rt, sid)
        snap = await rt.snapshot(sid)
        for i in range(rounds):
            await dirty(rt, sid)
            t = time.perf_counter()
            await rt.restore(sid, snap)
            restore.append(time.perf_counter() - t)
            await rt.exec(sid, ["true"])
            ready.append(time.perf_counter() - t)
            await check_reset(rt, sid, base, processes=True)
        await check_imports(rt, sid)
        for i in range(max(10, rounds // 4)):
            t = time.perf_counter()
            child = await rt.fork(snap)
            fork.append(time.perf_counter() - t)
            if i % 10 == 0:
                await check_reset(rt, child, base, processes=True)
            await rt.destroy(child)
    return {"ns_restore": restore, "ns_restore_ready": ready, "ns_fork": fork}


async def measure_dir(work: str, repo: str, base: str, deps: str, rounds: int,
                      skipped: dict[str, str]) -> dict[str, list[float]]:
    try:
        from sandboxd.dirrt import open_dir_runtime
    except ImportError as exc:
        skipped["dir"] = f"sandboxd.dirrt cannot be imported: {exc}"
        return {}
    times = []
    async with open_dir_runtime(os.path.join(work, "dir"), limits=LIMITS) as rt:
        sid = await rt.create("host", repo=repo, env=ENV)
        await install_deps(rt, sid, deps)
        snap = await rt.snapshot(sid)
        for _ in range(rounds):
            await dirty(rt, sid)
            t = time.perf_counter()
            await rt.restore(sid, snap)
            times.append(time.perf_counter() - t)
            await check_reset(rt, sid, base, processes=False)  # host processes: nothing to check
    return {"dir_restore": times}


async def podman_recreate(rt, sid: str, snap: str) -> None:
    """Reset by recreating the container from the snapshot's image (the podman runtime's restore)."""
    await rt.restore(sid, snap)


async def podman_git_reset(rt, sid: str) -> None:
    """Reset the files with git inside the running container (processes are left alone)."""
    res = await rt.exec(sid, "git reset -q --hard && git clean -q -fdx", timeout_s=120)
    assert res.exit_code == 0, res.output[-500:]


async def measure_podman(work: str, repo: str, base: str, deps: str, rounds: int,
                         skipped: dict[str, str]) -> dict[str, list[float]]:
    if shutil.which("podman") is None:
        skipped["podman"] = "podman is not installed"
        return {}
    try:
        from sandboxd.podman import open_podman_runtime
    except ImportError as exc:
        skipped["podman"] = f"sandboxd.podman cannot be imported: {exc}"
        return {}
    recreate, git_reset = [], []
    try:
        async with open_podman_runtime(os.path.join(work, "podman"), limits=LIMITS) as rt:
            sid = await rt.create("host", repo=repo, env=ENV)
            await install_deps(rt, sid, deps)
            snap = await rt.snapshot(sid)
            for _ in range(rounds):
                await dirty(rt, sid)
                t = time.perf_counter()
                await podman_recreate(rt, sid, snap)
                recreate.append(time.perf_counter() - t)
                await check_reset(rt, sid, base, processes=True, allowed=(PODMAN_KEEPER,))
            for _ in range(rounds):
                await dirty(rt, sid)
                t = time.perf_counter()
                await podman_git_reset(rt, sid)
                git_reset.append(time.perf_counter() - t)
                await check_reset(rt, sid, base, processes=False)  # the stray process lives on
                await rt.restore(sid, snap)  # so that strays do not pile up
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        skipped["podman"] = f"{type(exc).__name__}: {exc}"[:300]
        return {}
    return {"podman_recreate": recreate, "podman_git_reset": git_reset}


async def main(rounds: int, cache: str) -> dict:
    repo, base, deps = await trio.to_thread.run_sync(prepare_project, cache)
    files = count_files(repo)
    assert files >= MIN_FILES, f"{repo}: {files} files, want >= {MIN_FILES}"
    work = tempfile.mkdtemp(prefix="sandbox-reset-")
    skipped: dict[str, str] = {}
    load_before = os.getloadavg()[0]
    try:
        times = await measure_ns(work, repo, base, deps, rounds)
        times.update(await measure_dir(work, repo, base, deps, max(3, rounds // 40), skipped))
        times.update(await measure_podman(work, repo, base, deps, max(5, rounds // 20), skipped))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict = {"bench": "sandbox_reset", "project": f"{PROJECT} {VERSION}", "files": files}
    for name, xs in times.items():
        result[f"{name}_p50_ms"] = pct(xs, 0.5)
        result[f"{name}_p99_ms"] = pct(xs, 0.99)
        result[f"{name}_rounds"] = len(xs)
    reference = "podman_recreate" if "podman_recreate" in times else "dir_restore" if "dir_restore" in times else None
    if reference:
        result["speedup_reference"] = reference
        for name, xs in times.items():
            result[f"{name}_speedup"] = round(pct(times[reference], 0.5) / pct(xs, 0.5), 1)
    result["skipped"] = skipped
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after: a shared machine
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="ns restores (the peers do fewer)")
    parser.add_argument("--cache", default=os.environ.get("SANDBOXD_BENCH_CACHE",
                                                          os.path.expanduser("~/.cache/sandboxd-bench")))
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.rounds, args.cache)))
