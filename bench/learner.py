"""Learner step throughput and peak memory: ours against TRL's GRPO trainer loss step.

One DAPO step (forward + backward of every micro-batch; the AdamW step, the same for both, is left
out) on a small Qwen2-architecture model with Qwen2.5's real vocabulary (151,936: at long context the
logits are what runs out of memory), at 2k, 8k and 32k tokens per sequence:

- ours: the learner's path: packed rows (here one sequence per row), `model.model(...)` for the
  final hidden states, `learner.ops.token_logprobs` (chunked logprobs + entropy) on the loss
  positions only, `learner.losses.dapo_loss`, gradient checkpointing, `learner.engine.TorchEngine`.
- trl: `trl.GRPOTrainer` (loss_type="dapo", beta=0, eps 0.2/0.28, gradient checkpointing) built
  with a dummy reward function and dataset; each micro-batch is a prepared inputs dict
  (prompt/completion ids and masks, advantages, num_items_in_batch) passed to
  `trainer.compute_loss` and `trainer.accelerator.backward`, as `training_step` does after
  generation. TRL's own fused, chunked LM head computes the logprobs.

Same model (same seed), same sequences, same micro-batches (one sequence each, accumulated), same
gradient checkpointing. Each (variant, length) runs in its own subprocess, so its peak RSS
(ru_maxrss) is its own; `step_mib` is that peak minus the RSS just before the step (imports, model
and grads of a warm-up micro-batch excluded). A worker gets `--mem-limit-gib` of heap (RLIMIT_DATA)
and `--timeout-s` of wall time; past either it is reported as "oom" / "timeout". As a correctness
check both report the gradient norm of the step, which must agree (the loss is the same function).

    python bench/learner.py [--lengths 2048 8192 32768] [--hidden 256] [--layers 2] [--chunk-size 256]
        [--repeats 3] [--timeout-s 1500] [--mem-limit-gib 12]

The last line is one JSON object {"bench": "learner", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_VOCAB = 151_936
TARGET_SPEEDUP, TARGET_MEMORY = 1.5, 2.0  # at 8k tokens per sequence
VARIANTS = ("ours", "trl")


def _mib_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _model(args: argparse.Namespace):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=QWEN25_VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
        max_position_embeddings=max(args.lengths) + 1, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return Qwen2ForCausalLM(cfg)


def _sequences(length: int, count: int, seed: int) -> list[tuple[list[int], int, float]]:
    """`count` (token ids, prompt length, advantage): a quarter prompt, the rest model tokens."""
    import torch

    g = torch.Generator().manual_seed(seed + length)
    prompt = length // 4
    return [(torch.randint(3, QWEN25_VOCAB, (length,), generator=g).tolist(), prompt, 1.0 if i % 2 == 0 else -1.0)
            for i in range(count)]


def _ours(model, seqs, chunk_size: int):
    """Returns step(seqs) -> None running forward+backward over one-sequence micro-batches."""
    from learner.engine import OptimConfig, make_engine
    from learner.losses import dapo_loss
    from learner.ops import token_logprobs
    from learner.packing import Sample, pack, total_loss_tokens

    engine = make_engine(model, OptimConfig(), gradient_checkpointing=True)

    def step(batch):
        samples = [Sample(ids, [0] * p + [1] * (len(ids) - p), [0.0] * len(ids), adv) for ids, p, adv in batch]
        rows = pack(samples, max_tokens=max(len(ids) for ids, _, _ in batch))
        num_tokens = total_loss_tokens(rows)
        for row in rows:
            if len(row.cu_seqlens) != 2:  # several sequences: SDPA needs the block mask
                mask = {"attention_mask": row.attention_mask()[None, None]}
            else:  # one sequence: plain causal attention, no (T, T) mask
                mask = {}
            hidden = engine.model.model(input_ids=row.input_ids[None], position_ids=row.position_ids[None],
                                        **mask).last_hidden_state[0]  # (T, H)
            sel = row.loss_mask.bool()  # logprobs only where there is loss
            logp, ent = token_logprobs(hidden[sel], engine.model.lm_head.weight, row.targets[sel],
                                       chunk_size=chunk_size)
            loss, _ = dapo_loss(logp, logp.detach(), row.advantages[sel], row.loss_mask[sel],
                                num_tokens=num_tokens, entropies=ent)
            engine.backward(loss)

    return step


def _trl(model, seqs, args: argparse.Namespace):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from learner.engine import enable_gradient_checkpointing
    from learner.tiny import shared_tokenizer

    n = len(seqs)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), loss_type="dapo", beta=0.0, epsilon=0.2,
        epsilon_high=0.28, per_device_train_batch_size=2, num_generations=2, gradient_accumulation_steps=n,
        gradient_checkpointing=True, use_cpu=True, bf16=False, report_to=[], temperature=1.0,
        max_completion_length=max(len(ids) - p for ids, p, _ in seqs), logging_steps=10**9,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)], args=config,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * 2 * n}), processing_class=shared_tokenizer(),
    )
    # what Trainer.train() sets up before training_step: checkpointing (ours' settings), train mode,
    # the accumulation count the "dapo" normaliser reads
    enable_gradient_checkpointing(trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = n

    def step(batch):
        total = sum(len(ids) - p for ids, p, _ in batch)
        for ids, p, adv in batch:
            t = torch.tensor(ids)[None]
            inputs = {
                "prompt_ids": t[:, :p], "prompt_mask": torch.ones(1, p, dtype=torch.long),
                "completion_ids": t[:, p:], "completion_mask": torch.ones(1, t.shape[1] - p, dtype=torch.long),
                "advantages": torch.tensor([adv]), "num_items_in_batch": torch.tensor(float(total)),
            }
            loss = trainer.compute_loss(trainer.model, inputs)
            trainer.accelerator.backward(loss)

    return step


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    length = args.length
    count = max(1, args.step_tokens // length)
    seqs = _sequences(length, count, args.seed)
    model = _model(args)
    make = {"ours": lambda: _ours(model, seqs, args.chunk_size), "trl": lambda: _trl(model, seqs, args)}
    step = make[args.variant]()
    step(_sequences(256, 1, args.seed + 1))  # warm-up micro-batch: kernels, lazy allocations
    model.zero_grad(set_to_none=True)

    base_mib = _mib_status("VmRSS")
    repeats = args.repeats if count * length <= args.repeat_max_tokens else 1
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(seqs)
        times.append(time.perf_counter() - start)
    elapsed = sorted(times)[len(times) // 2]  # median: the machine is shared
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return {
        "variant": args.variant, "length": length, "sequences": count, "tokens": count * length,
        "seconds": round(elapsed, 3), "all_seconds": [round(t, 3) for t in times], "tokens_per_s": round(count * length / elapsed, 1),
        "peak_mib": round(peak_mib, 1), "base_mib": round(base_mib, 1), "step_mib": round(peak_mib - base_mib, 1),
        "vm_hwm_mib": round(_mib_status("VmHWM"), 1), "grad_norm": grad_norm,
    }


def _run_worker(args: argparse.Namespace, variant: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--length", str(length), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--threads", str(args.threads), "--seed", str(args.seed),
           "--step-tokens", str(args.step_tokens), "--chunk-size", str(args.chunk_size),
           "--repeats", str(args.repeats), "--repeat-max-tokens", str(args.repeat_max_tokens),
           "--lengths", *map(str, args.lengths)]
    limit = int(args.mem_limit_gib * 2**30)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    load_before = os.getloadavg()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env,
                              preexec_fn=preexec, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "length": length, "status": "timeout", "timeout_s": args.timeout_s,
                "load_before": load_before}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "status": "ok", "load_before": load_before, "load_after": os.getloadavg()}
    err = proc.stderr.strip().splitlines()
    oom = proc.returncode < 0 or any("alloc" in ln.lower() or "memory" in ln.lower() for ln in err[-5:])
    return {"variant": variant, "length": length, "status": "oom" if oom else "error", "returncode": proc.returncode,
            "mem_limit_gib": args.mem_limit_gib, "error": err[-1][:300] if err else "", "load_before": load_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768], help="tokens per sequence")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 64)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--step-tokens", type=int, default=8192,
                    help="tokens per step: max(1, step_tokens // length) sequences")
    ap.add_argument("--chunk-size", type=int, default=256,
                    help="token_logprobs chunk (ours): two (chunk, vocab) float32 blocks are alive at once")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per worker (median reported)")
    ap.add_argument("--repeat-max-tokens", type=int, default=16384, help="steps larger than this run once")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=1500.0, help="wall-clock limit per worker")
    ap.add_argument("--mem-limit-gib", type=float, default=12.0, help="heap limit per worker (RLIMIT_DATA)")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)), flush=True)
        return

    results = []
    for length in args.lengths:
        for variant in args.variants:  # interleaved, so both see the same machine load
            r = _run_worker(args, variant, length)
            results.append(r)
            print(json.dumps(r), flush=True)
    by = {(r["variant"], r["length"]): r for r in results}
    ratios = {}
    for length in args.lengths:
        ours, trl = by.get(("ours", length)), by.get(("trl", length))
        if ours and trl and ours["status"] == trl["status"] == "ok":
            ratios[str(length)] = {
                "speedup": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
                "peak_memory_ratio": round(trl["peak_mib"] / ours["peak_mib"], 3),
                "step_memory_ratio": round(trl["step_mib"] / ours["step_mib"], 3),
                "grad_norm_rel_diff": abs(ours["grad_norm"] - trl["grad_norm"]) / max(trl["grad_norm"], 1e-30),
            }
        else:
            ratios[str(length)] = {"ours": ours and ours["status"], "trl": trl and trl["status"]}
    at8k = ratios.get("8192", {})
    print(json.dumps({
        "bench": "learner",
        "model": {"vocab": QWEN25_VOCAB, "hidden": args.hidden, "layers": args.layers, "dtype": "float32"},
        "threads": args.threads, "step_tokens": args.step_tokens, "chunk_size": args.chunk_size,
        "repeats": args.repeats, "mem_limit_gib": args.mem_limit_gib,
        "timeout_s": args.timeout_s, "results": results, "ratios": ratios,
        "target_8k": {"speedup": TARGET_SPEEDUP, "memory": TARGET_MEMORY,
                      "met": bool(at8k.get("speedup", 0) >= TARGET_SPEEDUP
                                  and at8k.get("peak_memory_ratio", 0) >= TARGET_MEMORY)},
        "loadavg_end": os.getloadavg(),
    }))


if __name__ == "__main__":
    main()
