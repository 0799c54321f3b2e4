"""`sandboxd` command line: `sandboxd serve` runs the daemon, `sandboxd doctor` checks a node.

    sandboxd serve --listen unix:/run/sandboxd.sock --listen tcp://0.0.0.0:7070 \\
                   --token-file /etc/sandboxd/token --root /var/lib/sandboxd --runtime ns \\
                   --metrics-listen 127.0.0.1:9464 --log-format json
    sandboxd doctor --root /var/lib/sandboxd [--json]     # exit 0: the ns runtime can run here

On start the runtime removes what a previous crash left in its state directory (mounts die with the
daemon's private mount namespace; cgroups and containers are swept). SIGTERM and SIGINT stop it cleanly:
every sandbox is destroyed and the Unix socket removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import stat
import sys

import trio

from runtime.wire import WireServer

from . import logs
from .metrics import CallStats, daemon_registry, parse_http_listen, serve_metrics
from .service import RUNTIMES, build_router, open_runtime

log = logging.getLogger("sandboxd")

DEFAULT_LISTEN = "unix:/run/sandboxd.sock"
DEFAULT_ROOT = "/var/lib/sandboxd"


def read_token(path: str) -> str:
    """The token in `path`; refuses an empty file and warns when others may read it."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"sandboxd: --token-file {path}: {exc.strerror}") from exc
    if not token:
        raise SystemExit(f"sandboxd: --token-file {path} is empty")
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def fit_fd_limit(max_connections: int) -> int:
    """Raise the soft fd limit to the hard one; returns `max_connections`, lowered (with a warning)
    if the fds would run out first: a client over the limit gets a clear `busy`, not a hung connect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = soft - min(1024, soft // 4)  # fds for sandboxes, the zygote, layers and logs
    if max_connections > room:
        log.warning("--max-connections %d lowered to %d: the fd limit is %d (raise it with ulimit -n or "
                    "LimitNOFILE=)", max_connections, max(room, 1), soft)
        return max(room, 1)
    return max_connections


async def serve(args: argparse.Namespace, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    token = read_token(args.token_file) if args.token_file else None
    os.makedirs(args.root, mode=0o700, exist_ok=True)
    async with open_runtime(args.runtime, args.root) as runtime:
        calls = CallStats()
        server = WireServer(build_router(runtime, calls=calls), token=token, name=f"sandboxd/{args.runtime}",
                            max_connections=fit_fd_limit(args.max_connections),
                            hello_timeout_s=args.hello_timeout_s)
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve, args.listen)
            if args.metrics_listen:
                registry = daemon_registry(calls, wire=server, runtime_stats=runtime.stats, state_dir=args.root,
                                           runtime_name=args.runtime)
                url = await nursery.start(serve_metrics, args.metrics_listen, registry)
                print(f"sandboxd: metrics on {url}", file=sys.stderr, flush=True)
            log.info("sandboxd (%s runtime, state in %s) serving on %s", args.runtime, args.root, ", ".join(addresses))
            print(f"sandboxd: serving on {' '.join(addresses)}", file=sys.stderr, flush=True)
            task_status.started(addresses)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandboxd", description="Sandboxes for software-engineering agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"unix:PATH or tcp://HOST:PORT; repeatable (default {DEFAULT_LISTEN}); TCP needs --token-file")
    p.add_argument("--token-file", metavar="FILE", help="file holding the token clients must present")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--runtime", choices=RUNTIMES, default="ns", help="sandbox runtime (default ns)")
    p.add_argument("--max-connections", type=int, default=16384)
    p.add_argument("--hello-timeout-s", type=float, default=10.0,
                   help="close a connection that has not said hello by then (default 10)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=logs.FORMATS,
                   help="text, or json: one object per line (time, level, logger, message, fields)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)")
    d = sub.add_parser("doctor", help="check that this node can run sandboxes; exit 1 when the ns runtime cannot")
    d.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory to check (default {DEFAULT_ROOT})")
    d.add_argument("--json", action="store_true", help="one JSON object (for machines: a readiness probe)")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        raise SystemExit(doctor_main(args.root, as_json=args.json))
    logs.configure(args.log_level, args.log_format)
    if args.metrics_listen:
        try:
            parse_http_listen(args.metrics_listen)
        except ValueError as exc:
            parser.error(str(exc))
    args.listen = args.listen or [DEFAULT_LISTEN]
    if any(a.startswith("tcp://") for a in args.listen) and not args.token_file:
        parser.error("a tcp:// listener requires --token-file")
    try:
        trio.run(serve, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
