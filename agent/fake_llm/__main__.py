"""``python -m agent.fake_llm --port N --policy random|echo|scripted|MODULE:FACTORY [options]``.

Prints one JSON line ``{"url": ..., "port": ...}`` once it listens (use ``--port 0`` for a free port),
then serves until killed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import trio

from .policies import EchoPolicy, Policy, RandomPolicy, ScriptedPolicy
from .server import Faults, FakeLLM, parse_latency, serve_http


def _policy(args: argparse.Namespace) -> Policy:
    if args.policy == "random":
        length = args.length if args.max_length is None else (args.length, args.max_length)
        return RandomPolicy(vocab_size=args.vocab_size, length=length, seed=args.seed)
    if args.policy == "echo":
        return EchoPolicy()
    if args.policy == "scripted":
        if args.script is None:
            raise SystemExit("--policy scripted needs --script FILE (a JSON list of token-id lists)")
        return ScriptedPolicy(json.loads(Path(args.script).read_text()))
    module, sep, attr = args.policy.partition(":")
    if not sep:
        raise SystemExit(f"--policy: expected random, echo, scripted or MODULE:FACTORY, got {args.policy!r}")
    return getattr(importlib.import_module(module), attr)()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m agent.fake_llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", default="random", help="random, echo, scripted, or MODULE:FACTORY (an oracle)")
    p.add_argument("--script", help="for --policy scripted: JSON file, a list of token-id lists")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--length", type=int, default=32, help="random policy: tokens per answer")
    p.add_argument("--max-length", type=int, help="random policy: answers are LENGTH..MAX_LENGTH tokens")
    p.add_argument("--max-model-len", type=int, help="400 context errors above this many tokens")
    p.add_argument("--latency", default="0", help="SECONDS, exp:MEAN, uniform:LOW:HIGH or lognormal:MU:SIGMA")
    p.add_argument("--tokens-per-s", type=float, help="added latency per generated token")
    p.add_argument("--eos-token-id", type=int)
    p.add_argument("--no-return-token-ids", action="store_true", help="behave as vLLM < 0.10.2")
    for name in ("error", "hang", "disconnect", "malformed", "missing-token-ids", "abort"):
        p.add_argument(f"--{name}-rate", type=float, default=0.0)
    args = p.parse_args(argv)
    faults = Faults(error_rate=args.error_rate, hang_rate=args.hang_rate, disconnect_rate=args.disconnect_rate,
                    malformed_rate=args.malformed_rate, missing_token_ids_rate=args.missing_token_ids_rate,
                    abort_rate=args.abort_rate)
    fake = FakeLLM(_policy(args), model=args.model, max_model_len=args.max_model_len,
                   latency_s=parse_latency(args.latency), tokens_per_s=args.tokens_per_s, faults=faults,
                   seed=args.seed, eos_token_id=args.eos_token_id,
                   supports_return_token_ids=not args.no_return_token_ids)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, fake, args.port, args.host)
            print(json.dumps({"url": f"http://{args.host}:{port}", "port": port}), flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
