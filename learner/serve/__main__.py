"""``python -m learner.serve --model DIR --port N``: the embedded policy server on its own."""

from __future__ import annotations

import argparse
import logging

import torch
import trio

from . import ServeConfig, open_policy_server

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m learner.serve", description=__doc__)
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory (model + tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--served-model-name", default=None, help="model id at /v1/models (default: --model)")
    ap.add_argument("--max-num-seqs", type=int, default=ServeConfig.max_num_seqs)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--logprobs-mode", choices=["raw_logprobs", "processed_logprobs"], default="raw_logprobs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-version", type=int, default=0, help="weight_version reported before any update")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (on a busy small CPU, 1 avoids OpenMP spin-wait stalls)")
    args = ap.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ..tiny import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    config = ServeConfig(model_name=args.served_model_name or args.model, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.max_model_len, logprobs_mode=args.logprobs_mode, seed=args.seed)

    async def serve() -> None:
        async with open_policy_server(model, tokenizer, config, policy_version=args.policy_version,
                                      http_port=args.port, host=args.host) as server:
            logging.getLogger("learner.serve").info("serving %s on %s (device %s)", config.model_name,
                                                     server.http_url, args.device)
            await trio.sleep_forever()

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
