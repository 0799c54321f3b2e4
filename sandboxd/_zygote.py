"""The zygote: one process per runtime that has imported everything a sandbox init needs and
forks each sandbox's init (see `zygote.py` for the daemon's side).

Run as a script (`python -I -S sandboxd/_zygote.py FD`) from sandboxd's mount thread, with its
end of a SOCK_SEQPACKET socketpair at fd FD; the first datagram is the configuration (JSON):
{parent_pid, root, pool}. Start-up: PDEATHSIG (dies with the daemon's mount thread, and every
init dies with it), then a mount namespace of its own whose root is an empty read-only tmpfs
(`root`, a directory of the state directory, pivot_root()ed into): an init forked from here
copies that tiny namespace, not the daemon's mount table with every other sandbox in it. Then
`ready`.

It makes embryos (`_init.embryo`): children forked ahead of time, each pid 1 of a new pid
namespace (the zygote points its pid_ns_for_children at a fresh namespace, setns back to its own
then unshare(CLONE_NEWPID), right before fork()), that go on to make their net (lo up), ipc, uts
and mount namespaces. Each is delivered to the daemon as it is forked: {embryo: pid} + [pidfd,
socket]; the daemon hands a sandbox to an embryo directly over that socket (the zygote is not on
the create path). The zygote starts with `pool` embryos owed and forks one more, whenever it is
idle, per request `more` (the daemon took one). Children are reaped here.

Forked inits share the zygote's pages copy-on-write (gc.freeze() keeps the collector from
touching them). Standard library only.
"""

import array
import gc
import json
import os
import select
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import _init, linux  # noqa: E402

def isolate(root):
    """Leave the daemon's mount table: our own namespace whose root is an empty tmpfs."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "size=16k,mode=0755")
    os.mkdir(os.path.join(root, _init.SHELL_MOUNT_POINT.lstrip("/")), 0o755)
    os.mkdir(os.path.join(root, ".old"), 0o700)
    os.chdir(root)
    linux.pivot_root(".", ".old")
    os.chdir("/")
    linux.umount("/.old", linux.MNT_DETACH)
    os.rmdir("/.old")
    linux.mount(None, "/", None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)


class Zygote:
    def __init__(self, sock, own_pidns, owed):
        self.sock = sock
        self.own_pidns = own_pidns
        self.owed = owed  # embryos the daemon is waiting for
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def run(self):
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            events = poller.poll(0 if self.owed else None)
            if not events:
                try:
                    self.deliver_embryo()  # idle and owing one
                except OSError:
                    poller.poll(1000)  # out of pids or memory: try again later
                continue
            for fd, _ in events:
                if fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    self.serve_one()

    def reap(self):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def serve_one(self):
        data = self.sock.recv(65536)
        if not data:
            os._exit(0)  # the daemon closed its end
        if json.loads(data).get("op") == "more":
            self.owed += 1

    def deliver_embryo(self):
        pid, pidfd, embryo_sock = self.fork_embryo()  # the pidfd before any reap: no pid reuse
        try:
            self.sock.sendmsg([json.dumps({"embryo": pid}).encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd, embryo_sock.fileno()]))])
        except OSError:
            os._exit(0)  # the daemon is gone
        finally:
            os.close(pidfd)
            embryo_sock.close()  # the daemon's now
        self.owed -= 1

    def fork_embryo(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            linux.setns(self.own_pidns, linux.CLONE_NEWPID)  # back to our own, so that unshare may
            linux.unshare(linux.CLONE_NEWPID)  # ... make a new one for the next child
            gc.freeze()
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for fd in (self.sock.fileno(), self.wake_r, self.wake_w, self.own_pidns, ours.fileno()):
                    os.close(fd)
            except BaseException:
                os._exit(1)
            _init.embryo(theirs)  # never returns
        theirs.close()
        return pid, linux.pidfd_open(pid), ours


def main():
    # The configuration comes over the socket, not argv (argv is visible in the host's ps).
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    cfg = json.loads(sock.recv(65536))
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)  # the daemon died before we set PDEATHSIG
    linux.set_process_name("sandboxd-zygote")  # not the interpreter's host paths (inits inherit it)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        isolate(cfg["root"])
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
    except OSError as exc:
        _init.send(sock, {"fatal": f"zygote start-up: {exc}"})
        os._exit(1)
    zygote = Zygote(sock, own_pidns, int(cfg.get("pool", 4)))
    gc.freeze()
    _init.send(sock, {"ready": True})
    zygote.run()


if __name__ == "__main__":
    main()
