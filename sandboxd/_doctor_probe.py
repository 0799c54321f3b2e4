"""What `sandboxd doctor` cannot tell by reading files: whether this process may do what the ns
runtime does. Run as a script (`python -I -S sandboxd/_doctor_probe.py DIR`), as root; prints one
JSON object: {"ns.mnt": "ok" | "<error>", ..., "overlay": ..., "syscalls": ...}.

Each probe runs in a forked child, so that nothing it unshares or mounts outlives it: the overlay is
mounted in the child's own mount namespace (made private first), inside DIR, over a tmpfs upper as
the runtime's uppers are; the namespace and its mounts go when the child exits.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import linux  # noqa: E402

NAMESPACES = {"mnt": linux.CLONE_NEWNS, "pid": linux.CLONE_NEWPID, "net": linux.CLONE_NEWNET,
              "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS, "cgroup": linux.CLONE_NEWCGROUP}


def in_child(fn):
    """Run fn() in a forked child; "ok", or the error it raised, as a string."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanup
        os.close(r)
        try:
            fn()
            msg = "ok"
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            msg = f"{type(exc).__name__}: {exc}"
        os.write(w, msg.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return out or "the probe died without an answer"


def overlay(base):
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    lower, upper_fs, merged = (os.path.join(base, n) for n in ("lower", "u", "merged"))
    for d in (lower, upper_fs, merged):
        os.mkdir(d, 0o700)
    with open(os.path.join(lower, "file"), "w") as f:
        f.write("lower")
    linux.mount("tmpfs", upper_fs, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=0700")
    os.mkdir(os.path.join(upper_fs, "upper"))
    os.mkdir(os.path.join(upper_fs, "work"))
    linux.mount("overlay", merged, "overlay", 0,
                f"lowerdir={lower},upperdir={upper_fs}/upper,workdir={upper_fs}/work")
    with open(os.path.join(merged, "file")) as f:
        if f.read() != "lower":
            raise OSError("the overlay does not show its lower layer")
    with open(os.path.join(merged, "file"), "w") as f:  # copy-up into the tmpfs upper
        f.write("upper")
    with open(os.path.join(upper_fs, "upper", "file")) as f:
        if f.read() != "upper":
            raise OSError("a write through the overlay did not reach its upper")


def syscalls():
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        os.close(linux.openat2(fd, ".", os.O_PATH, 0, linux.RESOLVE_BENEATH))
    finally:
        os.close(fd)
    os.close(linux.pidfd_open(os.getpid()))
    os.close(linux.open_tree("/", linux.OPEN_TREE_CLONE))


def main():
    base = sys.argv[1]
    out = {f"ns.{name}": in_child(lambda flag=flag: linux.unshare(flag)) for name, flag in NAMESPACES.items()}
    out["overlay"] = in_child(lambda: overlay(base))
    out["syscalls"] = in_child(syscalls)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
