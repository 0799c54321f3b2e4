"""The init of one sandbox: pid 1 of its pid namespace, the executor that forks its commands.

Run as a script (`python -I -S sandboxd/_init.py FD`) from sandboxd's mount thread, with its end
of a SOCK_SEQPACKET socketpair at fd FD; the first datagram is the configuration (JSON).
Standard library only, and everything imported before pivot_root (nothing can be after).

Start-up:
  keeper  joins init's cgroup, opens the command cgroups' directories, unshare(mnt, pid, net, ipc, uts, cgroup), forks init,
          tells the daemon init's host pid, then only waits for it (PDEATHSIG: dies with the
          daemon's mount thread; init dies with it).
  init    (pid 1) makes every mount a slave (the daemon's mounts on <shell>/m still propagate in),
          brings `lo` up (the only interface), pivot_root()s into the shell (a tmpfs holding only
          the mount point `m`) and detaches the old root: no host path is reachable from here.
          Then it sets itself non-dumpable and says `ready`.

Requests (JSON, one per datagram, fds by SCM_RIGHTS) and replies:
  exec {id, argv, env, cwd, cgroups} + [stdin, output]  -> {id, pid} | {id, error, field}
                                                       later {id, exit}
  kill_all {id, wait}  SIGKILL every process of the namespace (kill(-1) from pid 1 is atomic
                  against forks) and unmount /m/proc -> {id, ok}; the processes are reaped before
                  the reply with `wait`, else right after it (before the next request is read)
  mount_proc {id} mount a fresh proc on /m/proc (after the daemon remounted /m) -> {id, ok}

A command's child: new session, default signal dispositions, joins its exec cgroup, chroot("/m"),
chdir(cwd), stdio from the passed fds, every other fd closed, then drops every capability
(bounding set, securebits, no_new_privs, capset) right before execve. It can neither reach the
shell (no CAP_SYS_CHROOT, and user namespaces are refused to chrooted processes) nor init
(non-dumpable: /proc/1/root and ptrace need CAP_SYS_PTRACE).
"""

import array
import errno
import json
import os
import select
import signal
import socket
import sys
import traceback
import warnings  # noqa: F401  os.execvpe imports it; nothing can be imported after pivot_root

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import linux  # noqa: E402

MAX_MESSAGE = 1 << 20
# Commands ready to go. A spare takes a few ms to get ready (a cgroup migration may wait for an
# RCU grace period), so two keep back-to-back execs off that path.
SPARES = 2


def send(sock, msg):
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:
        os._exit(0)  # the daemon is gone


def keeper(cfg, sock):
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)  # the daemon died before we set PDEATHSIG
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as f:
            f.write("0")
    exec_dir_fds = [os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in cfg["exec_dirs"]]
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWIPC
                  | linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP)
    pid = os.fork()
    if pid == 0:
        try:
            Init(cfg, sock, exec_dir_fds).run()
        except BaseException as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            send(sock, {"fatal": f"{type(exc).__name__}: {exc} (at {where.name}:{where.lineno})"})
        os._exit(1)
    for fd in exec_dir_fds:
        os.close(fd)
    send(sock, {"init_pid": pid})
    sock.close()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def recv_with_fds(sock, max_fds):
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(max_fds * 4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


class Init:
    """pid 1. Keeps *spares*: children already in its own exec cgroup, with default signal
    dispositions, a new session and an empty capability bounding set, blocked on a socket. An
    exec request is handed to the spare, which only has to chroot, chdir, take its stdio, drop
    its last capabilities and execve; the next spare is forked after the reply. Cgroup migration
    (which may wait for an RCU grace period) and the fork stay off the exec round trip."""

    def __init__(self, cfg, sock, exec_dir_fds):
        self.cfg = cfg
        self.sock = sock
        self.exec_dir_fds = exec_dir_fds
        self.execs = {}  # pid -> request id, for the exec's main process
        self.group_of = {}  # pid -> exec cgroup, for every spare and exec main process
        self.lingering = set()  # exec cgroups whose main process exited but others run on
        self.spares = []  # [(pid, socket, group)], oldest first
        self.counter = 0

    def setup(self):
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        linux.sethostname(self.cfg["hostname"])
        linux.set_loopback_up()
        os.chdir(self.cfg["shell"])
        linux.pivot_root(".", ".old")
        os.chdir("/")
        linux.umount("/.old", linux.MNT_DETACH)
        os.rmdir("/.old")
        linux.mount(None, "/", None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
        self.mount_proc()
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGTSTP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def mount_proc(self):
        linux.mount("proc", "/m/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)

    def run(self):
        self.setup()
        self.make_spares()
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
                send(self.sock, {"id": rid, "ok": True})
                # Reap after the reply: the daemon remounts while the killed processes exit, and
                # the next request (mount_proc) is read only once they are all gone.
                self.reap(block=True)
            elif op == "mount_proc":  # the last step of a restore: new spares after the reply
                self.mount_proc()
                send(self.sock, {"id": rid, "ok": True})
                self.make_spares()
            else:
                send(self.sock, {"id": rid, "error": f"bad request {op!r}", "field": "op"})
        except OSError as exc:
            send(self.sock, {"id": rid, "error": str(exc), "kind": "internal"})
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # ---------------------------------------------------------------- exec cgroups

    def group_path(self, index_rel, group):
        index, rel = index_rel
        return self.exec_dir_fds[index], rel.replace("{group}", group)

    def group_empty(self, group):
        fd, rel = self.group_path(self.cfg["exec_group_dir"], group)
        try:
            with open(os.open(f"{rel}/cgroup.procs", os.O_RDONLY, dir_fd=fd)) as f:
                return not f.read().strip()
        except FileNotFoundError:
            return True

    def remove_group(self, group):
        fd, rel = self.group_path(self.cfg["exec_group_dir"], group)
        try:
            os.rmdir(rel, dir_fd=fd)
            self.lingering.discard(group)
        except FileNotFoundError:
            self.lingering.discard(group)
        except OSError:
            self.lingering.add(group)  # EBUSY: a task is still exiting; retried on the next reap

    # ---------------------------------------------------------------- processes

    def make_spares(self):
        while len(self.spares) < SPARES:
            self.make_spare()

    def make_spare(self):
        group = f"x{self.counter}"
        self.counter += 1
        fd, rel = self.group_path(self.cfg["exec_group_dir"], group)
        os.mkdir(rel, dir_fd=fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            self.spare_main(theirs, group)  # never returns
        theirs.close()
        self.spares.append((pid, ours, group))
        self.group_of[pid] = group

    def spare_main(self, sock, group):
        """In the spare: get ready for any command, then wait for one (see the class docstring)."""
        setup_error = None
        try:
            signal.set_wakeup_fd(-1)
            for sig in range(1, signal.NSIG):
                if sig not in (signal.SIGKILL, signal.SIGSTOP):
                    try:
                        signal.signal(sig, signal.SIG_DFL)
                    except (OSError, ValueError):
                        pass
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.setsid()
            for index_rel in self.cfg["exec_join"]:
                fd, rel = self.group_path(index_rel, group)
                cg = os.open(rel, os.O_WRONLY, dir_fd=fd)
                os.write(cg, b"0")
                os.close(cg)
            linux.prepare_drop_capabilities()
            os.closerange(3, sock.fileno())  # nothing of init's: its socket, pipes, cgroup fds
            os.closerange(sock.fileno() + 1, 1 << 16)
        except BaseException as exc:
            setup_error = f"preparing the command: {exc}"
        try:
            data, fds = recv_with_fds(sock, 3)
        except BaseException:
            os._exit(0)
        if not data or len(fds) != 3:
            os._exit(0)  # init is gone, or garbage
        msg = json.loads(data)
        stdin_fd, out_fd, err_w = fds
        stage = "setup"
        try:
            if setup_error:
                raise RuntimeError(setup_error)
            os.chroot("/m")
            stage = "cwd"
            os.chdir(msg["cwd"])
            stage = "setup"
            os.dup2(stdin_fd, 0)
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 1 << 16)
            os.set_inheritable(err_w, False)
            linux.drop_capabilities()
            stage = "argv"
            os.execvpe(msg["argv"][0], msg["argv"], msg["env"])
        except BaseException as exc:
            err = getattr(exc, "errno", None)
            field = {"cwd": "cwd", "argv": "argv"}.get(stage)
            if stage == "argv" and err in (errno.ENOENT, errno.ENOTDIR):
                text = f"command not found: {msg['argv'][0]!r}"
            elif stage == "cwd":
                text = f"cwd {msg['cwd']!r}: {os.strerror(err) if err else exc}"
            else:
                text = f"{stage}: {exc}"
            kind = "not_found" if err in (errno.ENOENT, errno.ENOTDIR) else "bad_request"
            body = {"error": text, "field": field, "kind": kind if field else "internal"}
            try:
                os.write(err_w, json.dumps(body).encode())
            finally:
                os._exit(127)

    def exec(self, rid, msg, fds):
        if not self.spares:
            self.make_spare()
        pid, spare_sock, group = self.spares.pop(0)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            spare_sock.sendmsg([json.dumps(msg).encode()],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [*fds, err_w]))])
        except OSError:
            pass  # the spare died (killed by its cgroup?): err_r reads EOF-less below
        finally:
            for fd in (*fds, err_w):
                os.close(fd)
            fds.clear()  # so that no later spare inherits the command's pipes
            spare_sock.close()
        chunks = []
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(err_r)
        if chunks:
            send(self.sock, {"id": rid, **json.loads(b"".join(chunks))})
        else:  # exec'd (or the spare died first: its exit status tells)
            self.execs[pid] = rid
            send(self.sock, {"id": rid, "pid": pid, "group": group})
        self.make_spares()

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
            for spare in [s for s in self.spares if s[0] == pid]:
                spare[1].close()
                self.spares.remove(spare)
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
        try:
            linux.umount("/m/proc", linux.MNT_DETACH)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted
                raise


def main():
    # The configuration comes over the socket, not argv: /proc/1/cmdline is readable in the sandbox.
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    cfg = json.loads(sock.recv(MAX_MESSAGE))
    keeper(cfg, sock)


if __name__ == "__main__":
    main()
