"""Sampler-vs-trainer logprob gap of the embedded policy server.

Samples N sequences from the embedded server (sent concurrently, so they are decoded in one batch with
left padding, the way rollouts are), recomputes each sampled token's logprob with one plain
teacher-forced forward pass over prompt + completion (float32 log-softmax, what the learner computes),
and reports the mean and max absolute difference. The DAPO importance ratio is exp(new - old), so a gap
here is a bias in every ratio before any learning happens. Target: mean <= 1e-3 on CPU float32.

    python bench/logprob_gap.py [--n 32] [--max-tokens 64] [--model DIR] [--device cpu] [--dtype float32]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import trio  # noqa: E402

from learner.serve import ServeConfig, open_policy_server  # noqa: E402
from learner.tiny import load_model, shared_tokenizer, tiny_model  # noqa: E402

TARGET_MEAN = 1e-3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="sequences sampled")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: a tiny Qwen2 built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    if args.model:
        model, tok = load_model(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    else:
        tok = shared_tokenizer()
        model = tiny_model(tok, seed=args.seed, init_std=0.3).to(args.device, _DTYPES[args.dtype])
    rng = random.Random(args.seed)
    words = ["def", "add", "(a, b):", "\n    return", "a - b", "<function=bash>", "ls", "</function>", "x = 1"]
    prompts = [tok.encode(" ".join(rng.choices(words, k=rng.randint(2, 12)))) for _ in range(args.n)]
    results: list = [None] * args.n

    async def sample() -> tuple[float, int]:
        async with open_policy_server(model, tok, ServeConfig(max_num_seqs=max(args.n, 1))) as server:
            async def one(i: int) -> None:
                results[i] = await server.complete(prompts[i], max_tokens=args.max_tokens, seed=args.seed + i,
                                                   temperature=args.temperature, ignore_eos=True)

            await server.complete(prompts[0], max_tokens=2)  # warm-up: the first forward pass loads kernels
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(args.n):
                    nursery.start_soon(one, i)
            return time.perf_counter() - start, server.stats.max_decode_rows

    sample_s, rows = trio.run(sample)
    gaps: list[float] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt, c in zip(prompts, results):
            ids = torch.tensor([prompt + c.token_ids], device=args.device)
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c.token_ids), device=args.device)
            recomputed = logprobs[positions, torch.tensor(c.token_ids, device=args.device)]
            gaps.extend((recomputed.cpu() - torch.tensor(c.logprobs)).abs().tolist())
    recompute_s = time.perf_counter() - start
    mean_gap, max_gap = sum(gaps) / len(gaps), max(gaps)
    print(f"{len(results)} sequences, {len(gaps)} tokens, up to {rows} rows per decode step; "
          f"sampling {sample_s:.2f} s, recompute {recompute_s:.2f} s")
    print(json.dumps({
        "bench": "logprob_gap", "mean_abs_gap": mean_gap, "max_abs_gap": max_gap, "target_mean": TARGET_MEAN,
        "ok": mean_gap <= TARGET_MEAN, "sequences": len(results), "tokens": len(gaps), "max_decode_rows": rows,
        "sample_tokens_per_s": len(gaps) / sample_s, "recompute_tokens_per_s": len(gaps) / recompute_s,
        "device": args.device, "dtype": args.dtype, "temperature": args.temperature,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
