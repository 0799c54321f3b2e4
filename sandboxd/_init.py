"""The init of one sandbox: pid 1 of its pid namespace, the executor that spawns its commands.

Forked by the zygote (`_zygote.py`) ahead of time as the first process of a new pid namespace:
an *embryo* (`embryo()`) sets PDEATHSIG (it dies with the zygote, which dies with the daemon),
makes itself non-dumpable, unshares its mount, net, ipc and uts namespaces, sets the hostname,
brings `lo` up (the only interface), empties its capability bounding set (no_new_privs,
securebits: root gets nothing on execve, locked; init keeps its own capabilities, nothing it
spawns has any), then waits. Handed a sandbox, it gets
  fds[0]   its end of a SOCK_SEQPACKET socketpair to the daemon (the init channel)
  fds[1]   a detached copy of the sandbox's shell mount tree (open_tree(2) by the mount thread)
  fds[2:]  the sandbox's cgroup directories (O_PATH), see cgroups.py
and becomes its init. Standard library only, everything imported by the zygote before it forked
(nothing can be imported after pivot_root).

Start-up (`Init.setup`): joins its cgroups, unshare(cgroup), attaches the shell tree and makes
every mount a slave (the daemon's later mounts in the shell still propagate in), pivot_root()s
into the shell (a tmpfs holding only the sandbox's roots, see roots.py) and detaches the old
root: no host path is reachable from here. Then it says `ready`.

Requests (JSON, one per datagram, fds by SCM_RIGHTS) and replies:
  exec {id, argv, env, cwd} + [stdin, output]  -> {id, pid, group} | {id, error, field, kind}
                                                  later {id, exit}
  kill_all {id, wait, unmount_proc}  SIGKILL every process of the namespace (kill(-1) from
                  pid 1 is atomic against forks) -> {id, ok}; the processes are reaped before the
                  reply with `wait`, else right after it (before the next request is read); with
                  `unmount_proc`, the current root's /proc goes too (the daemon unmounts that root)
  switch_root {id, root}  the daemon mounted root generation `root`: mount a proc in it, make it
                  the root of every later command -> {id, ok}; then let go of the previous root
                  (unmount its proc) and say so: {released: <previous root>}

A command is posix_spawn()ed (vfork + exec: nothing of init's memory is copied or torn down),
in a new session with default signal dispositions, stdio from the passed fds and every other fd
closed, chdir'ed to its cwd. For the call, init chroot()s into the current root and joins the
command's exec cgroup, which the child inherits; then init goes back to the shell and to its own
cgroups. Its cwd and PATH are resolved in the root with openat2(RESOLVE_IN_ROOT), never through
/proc magic links (they would resolve in init's context). The command can neither reach the shell (no CAP_SYS_CHROOT, and user namespaces are refused to
chrooted processes) nor init (non-dumpable: /proc/1/root and ptrace need CAP_SYS_PTRACE).
"""

import array
import errno
import fcntl  # noqa: F401  linux.set_loopback_up imports it
import json
import os
import select
import signal
import socket
import stat
import traceback

from sandboxd import linux

MAX_MESSAGE = 1 << 20
SHELL_MOUNT_POINT = "/s"  # in the zygote's root, where init attaches its shell tree
HOSTNAME = "sandbox"
MAX_FDS = 16
# Commands run as uid 0 without capabilities, and these kernel knobs check only the file mode,
# which lets the owner (root) write: kernel.core_pattern would run a program of the sandbox's
# choosing on the host, sysrq-trigger reboots it, irq/*/smp_affinity steers the host's interrupts.
# Read-only binds over them in every root's /proc, as container runtimes do (the proc unmount,
# MNT_DETACH, takes them along).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi")


def send(sock, msg):
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:
        os._exit(0)  # the daemon is gone


def recv_with_fds(sock, max_fds):
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(max_fds * 4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, list(fds)


def embryo(sock):
    """In the zygote's fresh child: the part of an init's start-up that does not depend on its
    sandbox, done before one asks; then wait for one (`start`). Never returns."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        linux.set_process_name("init")  # what the sandbox sees as pid 1's cmdline
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        linux.sethostname(HOSTNAME)
        linux.set_loopback_up()
        # For everything spawned from here on; init keeps its own effective capabilities.
        linux.prepare_drop_capabilities()
        linux.clear_inheritable_capabilities()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGTSTP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        data, fds = recv_with_fds(sock, MAX_FDS)
    except BaseException:
        os._exit(1)  # the zygote hands out live embryos only
    if not data:
        os._exit(0)
    sock.close()
    start(json.loads(data), fds)


def start(cfg, fds):
    """Become the init of the sandbox that `cfg` and `fds` describe; never returns."""
    sock = socket.socket(fileno=fds[0])
    try:
        Init(cfg, sock, fds[1], fds[2:]).run()
    except BaseException as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        send(sock, {"fatal": f"{type(exc).__name__}: {exc} (at {where.name}:{where.lineno})"})
    os._exit(1)


class ExecError(Exception):
    def __init__(self, text, field, kind):
        super().__init__(text)
        self.reply = {"error": text, "field": field, "kind": kind}


# Paths a command names are resolved in its root as its own lookups would be (absolute symlinks
# and `..` stay inside), and never through /proc magic links, which would resolve in init's
# context (its fds, its root), not the command's.
IN_ROOT = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS


def find_command(root_fd, name, path_env, cwd):
    """execvp's search: the first regular executable file named `name` on PATH (relative entries
    from the command's cwd); the path to exec, as the command sees it."""
    if "/" in name:
        return name
    for d in (path_env or "/usr/bin:/bin").split(":"):
        candidate = os.path.join(cwd, d, name)
        try:
            fd = linux.openat2(root_fd, candidate, os.O_PATH, 0, IN_ROOT)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    raise ExecError(f"command not found: {name!r}", "argv", "not_found")


class Init:
    def __init__(self, cfg, sock, tree_fd, cgroup_fds):
        self.cfg = cfg
        self.sock = sock
        self.tree_fd = tree_fd
        self.cgroup_fds = cgroup_fds
        self.home = [self.open_cgroup_file(entry, "") for entry in cfg["init_join"]]
        self.shell_fd = -1
        self.root = ""  # the current root generation, a directory of the shell
        self.root_fd = -1  # and an fd of it; closed once the root is replaced (it would pin it)
        self.proc_on = None  # the root whose /proc is mounted
        self.execs = {}  # pid -> request id, for the exec's main process
        self.group_of = {}  # pid -> exec cgroup, for every exec main process
        self.lingering = set()  # exec cgroups whose main process exited but others run on
        self.counter = 0

    def open_cgroup_file(self, index_rel, group):
        index, rel = index_rel
        return os.open(rel.replace("{group}", group), os.O_WRONLY | os.O_CLOEXEC, dir_fd=self.cgroup_fds[index])

    def join_home(self):
        for fd in self.home:
            os.write(fd, b"0")

    def setup(self):
        self.join_home()
        linux.unshare(linux.CLONE_NEWCGROUP)  # its root: the group just joined
        linux.move_mount(self.tree_fd, SHELL_MOUNT_POINT)
        os.close(self.tree_fd)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        os.chdir(SHELL_MOUNT_POINT)
        linux.pivot_root(".", ".old")
        os.chdir("/")
        linux.umount("/.old", linux.MNT_DETACH)
        os.rmdir("/.old")
        linux.mount(None, "/", None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
        self.shell_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.switch_root(self.cfg["root"])
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def switch_root(self, root):
        """Make `root` (a directory of the shell, where the daemon mounted a root) the current
        root; returns the previous one, still to be released."""
        if "/" in root or root.startswith("."):
            raise OSError(errno.EINVAL, f"bad root name {root!r}")
        linux.mount("proc", f"/{root}/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        for name in PROC_READ_ONLY:
            path = f"/{root}/proc/{name}"
            try:
                linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            except FileNotFoundError:  # not in this kernel's /proc
                continue
            linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
                        | linux.MS_NODEV | linux.MS_NOEXEC)
        old, old_fd = self.root, self.root_fd
        self.root, self.proc_on = root, root
        self.root_fd = os.open(f"/{root}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if old_fd >= 0:
            os.close(old_fd)
        return old

    def unmount_proc(self, root):
        try:
            linux.umount(f"/{root}/proc", linux.MNT_DETACH)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted
                raise

    def run(self):
        self.setup()
        send(self.sock, {"ready": True})
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap(block=False)
                else:
                    self.serve_one()

    def serve_one(self):
        data, fds = recv_with_fds(self.sock, 4)
        if not data:
            os._exit(0)  # the daemon closed its end: destroy
        msg = json.loads(data)
        op, rid = msg.get("op"), msg.get("id")
        try:
            if op == "exec" and len(fds) == 2:
                self.exec(rid, msg, fds)
            elif op == "kill_all":
                self.kill_all()
                if msg.get("wait"):
                    self.reap(block=True)
                if msg.get("unmount_proc") and self.proc_on:
                    self.unmount_proc(self.proc_on)
                    os.close(self.root_fd)
                    self.root_fd, self.proc_on = -1, None
                send(self.sock, {"id": rid, "ok": True})
                # Reap after the reply: the daemon mounts the new root while the killed processes
                # exit, and the next request (switch_root) is read only once they are all gone.
                self.reap(block=True)
            elif op == "switch_root":  # the last step of a restore or snapshot
                had_proc = self.proc_on == self.root
                old = self.switch_root(str(msg.get("root")))
                send(self.sock, {"id": rid, "ok": True})
                if had_proc and old:
                    self.unmount_proc(old)
                    send(self.sock, {"released": old})
            else:
                send(self.sock, {"id": rid, "error": f"bad request {op!r}", "field": "op"})
        except ExecError as exc:
            send(self.sock, {"id": rid, **exc.reply})
        except OSError as exc:
            send(self.sock, {"id": rid, "error": str(exc), "kind": "internal"})
        finally:
            for fd in fds:
                os.close(fd)

    # ---------------------------------------------------------------- exec cgroups

    def group_dir(self, group):
        index, rel = self.cfg["exec_group_dir"]
        return self.cgroup_fds[index], rel.replace("{group}", group)

    def group_empty(self, group):
        fd, rel = self.group_dir(group)
        try:
            with open(os.open(f"{rel}/cgroup.procs", os.O_RDONLY, dir_fd=fd)) as f:
                return not f.read().strip()
        except FileNotFoundError:
            return True

    def remove_group(self, group):
        fd, rel = self.group_dir(group)
        try:
            os.rmdir(rel, dir_fd=fd)
            self.lingering.discard(group)
        except FileNotFoundError:
            self.lingering.discard(group)
        except OSError:
            self.lingering.add(group)  # EBUSY: a task is still exiting; retried on the next reap

    def join_group(self, group):
        for entry in self.cfg["exec_join"]:
            fd = self.open_cgroup_file(entry, group)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    # ---------------------------------------------------------------- processes

    def exec(self, rid, msg, fds):
        if self.root_fd < 0:
            raise ExecError("the sandbox root is being replaced", None, "internal")
        argv, env = msg["argv"], msg["env"]
        group = f"x{self.counter}"
        self.counter += 1
        fd, rel = self.group_dir(group)
        os.mkdir(rel, dir_fd=fd)
        try:
            pid = self.spawn_in_root(argv, env, msg["cwd"], group, fds)
        except BaseException:
            self.remove_group(group)
            raise
        self.execs[pid] = rid
        self.group_of[pid] = group
        send(self.sock, {"id": rid, "pid": pid, "group": group})

    def spawn_in_root(self, argv, env, cwd, group, fds):
        try:
            cwd_fd = linux.openat2(self.root_fd, cwd, os.O_PATH | os.O_DIRECTORY, 0, IN_ROOT)
        except OSError as exc:
            kind = "not_found" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else "bad_request"
            raise ExecError(f"cwd {cwd!r}: {os.strerror(exc.errno)}", "cwd", kind) from None
        path = None
        try:
            path = find_command(self.root_fd, argv[0], env.get("PATH"), cwd)
            try:
                self.join_group(group)  # the child inherits our cgroups and root
                os.fchdir(self.root_fd)
                os.chroot(".")
                try:
                    return linux.spawn(path, argv, env, stdin=fds[0], stdout=fds[1], stderr=fds[1],
                                       cwd_fd=cwd_fd)
                finally:
                    os.fchdir(self.shell_fd)
                    os.chroot(".")
            finally:
                self.join_home()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and exc.filename == path:
                raise ExecError(f"command not found: {argv[0]!r}", "argv", "not_found") from None
            if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.ETXTBSY, errno.ELOOP) \
                    and exc.filename == path:
                raise ExecError(f"cannot execute {argv[0]!r}: {os.strerror(exc.errno)}", "argv",
                                "bad_request") from None
            if exc.errno in (errno.EAGAIN, errno.ENOMEM):
                raise ExecError(f"no new process in this sandbox: {os.strerror(exc.errno)} (its pids or "
                                "memory limit)", "limits", "limit") from None
            raise
        finally:
            os.close(cwd_fd)

    def reap(self, block):
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            rid = self.execs.pop(pid, None)
            if rid is not None:
                send(self.sock, {"id": rid, "exit": os.waitstatus_to_exitcode(status)})
            group = self.group_of.pop(pid, None)
            if group is not None:
                self.lingering.add(group)
        for group in list(self.lingering):
            if group not in self.group_of.values() and self.group_empty(group):
                self.remove_group(group)

    def kill_all(self):
        try:
            os.kill(-1, signal.SIGKILL)  # every process of this pid namespace but pid 1
        except ProcessLookupError:
            pass
