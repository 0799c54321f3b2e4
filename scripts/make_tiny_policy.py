"""Build the tiny policy checkpoint that the embedded default run starts from.

    .venv/bin/python scripts/make_tiny_policy.py --seed 0 --out learner/assets/tiny-policy

Reproducible from its seed (same data, tokenizer and initial weights; the SFT is deterministic on
one CPU thread count), a few minutes on a 2-core CPU. Steps: a train-split toy suite -> real and
synthetic bug sites -> tokenizer -> mixture episodes recorded through the scaffold -> SFT of a small
Qwen2 -> rollouts on held-out (and train) toy tasks with the embedded policy server in real `ns`
sandboxes -> `learner.tiny.save_model` + ``provenance.json``. See `learner.tiny_policy`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384,
         "max_position_embeddings": 2048}


def _log(msg: str) -> None:
    print(f"[make_tiny_policy] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_data(seed: int, workdir: Path, *, vocab_size: int, real_episodes: int, synthetic_episodes: int,
               rename: float = 0.0, copy_fraction: float = 0.0, mix=None, split_words: bool = True):
    """(tokenizer, samples, info) for `seed`; toy repositories are written under `workdir`."""
    from agent.scaffold import system_prompt
    from agent.toy import TEMPLATES, TRAIN_TEMPLATES, generate_suite
    from learner import tiny_policy as tp

    tasks = generate_suite(seed, 96, 0, workdir / "train-suite", python="python3")
    real = tp.real_sites(tasks)
    rng = random.Random(f"tiny-policy-synthetic:{seed}")
    synthetic = [tp.synthetic_site_files(t, s, rng, i)
                 for i, (t, s) in enumerate(tp.synthetic_sites(TRAIN_TEMPLATES, rng, per_line=3))]
    corpus = [system_prompt()] * 20 + [s.issue for s in real + synthetic]
    for name in TRAIN_TEMPLATES:
        corpus += list(TEMPLATES[name].modules.values()) + list(TEMPLATES[name].tests.values())
    corpus += ["\n".join(tp.plan_episode(s, random.Random(i))[0]) for i, s in enumerate(real + synthetic)]
    # Renamed copies: the fresh names' word pieces (generic words, never held-out code) become tokens.
    renamed = [tp.rename_site(s, random.Random(f"tok:{i}")) for i, s in enumerate(real + synthetic)]
    corpus += [s.issue for s in renamed] + [s.files[s.buggy_file] for s in renamed]
    corpus += [" ".join(tp.WORDS)] * 20
    if not split_words:  # the code lines themselves must be frequent for cross-word merges to form
        for name in TRAIN_TEMPLATES:
            corpus += list(TEMPLATES[name].modules.values()) * 10
    tokenizer = tp.train_tokenizer(corpus, vocab_size, split_words=split_words)
    mix = mix or tp.MIX
    samples = tp.generate_data(real, tokenizer, episodes_per_site=real_episodes, seed=seed, rename=rename, mix=mix)
    if synthetic_episodes:
        samples += tp.generate_data(synthetic, tokenizer, episodes_per_site=synthetic_episodes, seed=seed,
                                    rename=rename, mix=mix)
    if copy_fraction > 0:  # copy warm-up samples, sharing the episodes' system-prompt prefix
        n_copy = int(len(samples) * copy_fraction / (1 - copy_fraction))
        samples += tp.copy_samples(real + synthetic, tokenizer, n_copy, seed=seed,
                                   prefix_ids=samples[0].ids[:tp.common_prefix(samples)])
    info = {"real_sites": len(real), "synthetic_sites": len(synthetic), "episodes": len(samples),
            "tokens": sum(len(s.ids) for s in samples), "action_tokens": sum(sum(s.loss_mask) for s in samples),
            "moves": dict(Counter(s.move for s in samples)), "vocab_size": len(tokenizer), "rename": rename,
            "copy_fraction": copy_fraction}
    return tokenizer, samples, info


def monitor_data(seed: int, workdir: Path, tokenizer, n: int, source: str = "templates"):
    """Correct-fix episodes only for the accuracy logged during the SFT, never trained on: of the
    held-out templates (`source` "templates": code never seen by the model or the tokenizer), or
    unseen instances of the train templates' bugs ("instances": another generator seed)."""
    from agent.toy import generate_suite
    from learner import tiny_policy as tp

    n_train, n_heldout = (0, n) if source == "templates" else (n, 0)
    tasks = generate_suite(seed + 104729, n_train, n_heldout, workdir / "monitor-suite", python="python3")
    fix_only = tp.Mix(wrong_locate=0.0, same_line_wrong=0.0, other_line_wrong=0.0, no_edit=0.0)
    return tp.generate_data(tp.real_sites(tasks), tokenizer, episodes_per_site=1, seed=seed, mix=fix_only)


async def _evaluate(model, tokenizer, seed: int, workdir: Path, n_heldout: int, n_train: int, group: int) -> dict:
    from agent.toy import generate_suite
    from learner import tiny_policy as tp
    from sandboxd.client import open_local

    # A suite seed the training data never used: other package names, issue texts and task order.
    tasks = generate_suite(seed + 7919, n_train, n_heldout, workdir / "eval-suite", python="python3")
    out = {}
    async with open_local("ns") as node:
        for split in ("heldout", "train"):
            chosen = [t for t in tasks if t.split == split]
            if not chosen:
                continue
            figures, groups = await tp.evaluate_policy(model, tokenizer, chosen, group=group, seed=seed, node=node)
            by_kind: dict[str, list[float]] = {}
            for g in groups:
                task = next(t for t in chosen if t.id == g[0].trajectory.task_id)
                by_kind.setdefault(task.metadata["bug_kind"], []).extend(bool(r.trajectory.resolved) for r in g)
            figures["solve_rate_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
            out[split] = figures
            _log(f"{split}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("learner/assets/tiny-policy"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--line-merges", action="store_true",
                   help="tokenizer merges may cross words (code lines of the corpus become a few tokens)")
    p.add_argument("--real-episodes", type=int, default=8, help="mixture episodes per real train task")
    p.add_argument("--mix", default="", help="moves of the data, e.g. wrong_locate=0.15,no_edit=0.2 "
                   "(fields of tiny_policy.Mix; the rest of the edit step is the correct fix)")
    p.add_argument("--synthetic-episodes", type=int, default=3, help="mixture episodes per synthetic site")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rename", type=float, default=0.0, help="fraction of episodes on renamed sites (fresh names)")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--induction-steps", type=int, default=0,
                   help="random-repeat copy pre-training steps before the SFT (induction heads form at ~1200-1500)")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights (same tokenizer)")
    p.add_argument("--copy-fraction", type=float, default=0.0, help="fraction of samples that are copy warm-ups")
    p.add_argument("--context-weight", type=float, default=0.0,
                   help="loss weight of non-action tokens (issue, observations) relative to actions")
    p.add_argument("--monitor", type=int, default=24, help="held-out-template episodes for the logged accuracy")
    p.add_argument("--monitor-from", choices=["templates", "instances"], default="templates",
                   help="monitor episodes of the held-out templates, or unseen instances of the train templates")
    p.add_argument("--monitor-every", type=int, default=100)
    p.add_argument("--save-partial", action="store_true", help="save <out>.partial at every monitor step")
    p.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    p.add_argument("--layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--eval-heldout", type=int, default=16, help="held-out tasks rolled out (0: skip the check)")
    p.add_argument("--eval-train", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="rollouts per task in the check")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    import trio

    from learner import tiny_policy as tp
    from learner.tiny import save_model, tiny_model

    torch.set_num_threads(args.threads)
    try:
        mix = tp.Mix(**{k: float(v) for k, v in (kv.split("=", 1) for kv in args.mix.split(",") if kv)})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--mix {args.mix!r}: {e}") from None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="make-tiny-policy-") as tmp:
        work = Path(tmp)
        tokenizer, samples, data_info = build_data(args.seed, work, vocab_size=args.vocab_size,
                                                   real_episodes=args.real_episodes,
                                                   synthetic_episodes=args.synthetic_episodes, rename=args.rename,
                                                   copy_fraction=args.copy_fraction, mix=mix,
                                                   split_words=not args.line_merges)
        monitor = monitor_data(args.seed, work, tokenizer, args.monitor, args.monitor_from) if args.monitor else []
        _log(f"data: {json.dumps(data_info)} ({time.perf_counter() - t_start:.0f}s)")
        MODEL.update(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=3 * args.hidden)
        model = tiny_model(tokenizer, seed=args.seed, **MODEL)
        if args.init is not None:  # warm start (e.g. a copy warm-up) built with this very tokenizer
            from learner.tiny import load_model

            init_model, init_tok = load_model(args.init)
            if init_tok.get_vocab() != tokenizer.get_vocab():
                raise SystemExit(f"--init {args.init}: its tokenizer differs from the one built for seed {args.seed}")
            model.load_state_dict(init_model.state_dict())
            _log(f"initialised from {args.init}")
        induction = tp.induction_warmup(model, args.induction_steps, seed=args.seed, log=_log) \
            if args.induction_steps else {}
        params = sum(p.numel() for p in model.parameters())
        _log(f"model: {params} parameters {MODEL}")
        sft = tp.SFTConfig(steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
                           warmup_steps=args.warmup, context_weight=args.context_weight)
        partial = args.out.parent / (args.out.name + ".partial")

        def save_partial(step: int, acc: dict) -> None:
            save_model(model, tokenizer, partial)
            (partial / "partial.json").write_text(json.dumps({"step": step, **acc}) + "\n")

        losses = tp.pretrain(model, samples, sft, log=_log, monitor=monitor, monitor_every=args.monitor_every,
                             on_monitor=save_partial if args.save_partial else None)
        evaluation = {}
        if args.eval_heldout or args.eval_train:
            t0 = time.perf_counter()
            evaluation = trio.run(_evaluate, model, tokenizer, args.seed, work, args.eval_heldout, args.eval_train,
                                  args.group)
            evaluation["eval_s"] = time.perf_counter() - t0
    out = save_model(model, tokenizer, args.out)
    provenance = {
        "seed": args.seed,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": {**MODEL, "vocab_size": len(tokenizer), "parameters": params},
        "data": data_info,
        "mix": dataclasses.asdict(mix),
        "sft": {**dataclasses.asdict(sft), **losses},
        "init": str(args.init) if args.init else None,
        "induction": induction,
        "episode": dataclasses.asdict(tp.TinyEpisode()),
        "evaluation": evaluation,
        "time_s": time.perf_counter() - t_start,
        "torch_threads": args.threads,
        "files": {"model.safetensors": {"sha256": sha256(out / "model.safetensors"),
                                        "bytes": (out / "model.safetensors").stat().st_size}},
    }
    _write_json(out / "provenance.json", provenance)
    _log(f"wrote {out} in {provenance['time_s']:.0f}s")
    print(json.dumps({"out": str(out), "parameters": params, "loss_final": losses["loss/final"],
                      "heldout_solve_rate": evaluation.get("heldout", {}).get("solve_rate"),
                      "train_solve_rate": evaluation.get("train", {}).get("solve_rate"),
                      "time_s": round(provenance["time_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
