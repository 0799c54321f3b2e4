"""The shipped tiny policy (learner/assets/tiny-policy) and its data generator (learner.tiny_policy)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from learner import tiny_policy as tp  # noqa: E402

ASSET = Path(__file__).resolve().parents[2] / "learner" / "assets" / "tiny-policy"
needs_asset = pytest.mark.skipif(not (ASSET / "model.safetensors").exists(),
                                 reason="run scripts/make_tiny_policy.py to build the shipped tiny policy")


@pytest.fixture(scope="module")
def shipped():
    from learner.tiny import load_model

    torch.set_num_threads(1)
    return load_model(ASSET)


@pytest.fixture(scope="module")
def provenance():
    return json.loads((ASSET / "provenance.json").read_text())


# -- the shipped checkpoint ------------------------------------------------------------------------


@needs_asset
def test_provenance_matches_the_files(shipped, provenance):
    model, tokenizer = shipped
    data = (ASSET / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == provenance["files"]["model.safetensors"]["sha256"]
    assert len(data) == provenance["files"]["model.safetensors"]["bytes"] < 20 << 20
    assert sum(p.numel() for p in model.parameters()) == provenance["model"]["parameters"]
    assert len(tokenizer) == provenance["model"]["vocab_size"] == model.config.vocab_size
    assert isinstance(provenance["seed"], int) and "make_tiny_policy.py" in provenance["command"]
    # the check of the build: unseen instances of the train templates' bugs solved sometimes, not always
    check = provenance["evaluation"]["train"]
    assert 0.05 <= check["solve_rate"] <= 0.6 and check["mixed_groups"] >= 0.3
    assert 0.0 <= provenance["evaluation"]["heldout"]["solve_rate"] <= 1.0


@needs_asset
def test_shipped_tokenizer_loads_with_the_pre_tokenizer_it_was_trained_with():
    """transformers 5 gives a qwen2 directory Qwen2's word-splitting regex; the shipped tokenizer's merges
    cross words, so loading must keep the file's pre-tokenizer (`agent.scaffold.load_tokenizer`)."""
    from tokenizers import Tokenizer

    from agent.scaffold import load_tokenizer

    raw = Tokenizer.from_file(str(ASSET / "tokenizer.json"))
    line = "        return self.balance() - self.overdraft"
    tok = load_tokenizer(ASSET)
    assert tok.encode(line, add_special_tokens=False) == raw.encode(line).ids
    assert len(raw.encode(line).ids) <= 8  # a code line of the toy suite is a few tokens
    assert tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == raw.token_to_id("<|im_end|>")


@needs_asset
def test_tokenizer_round_trips_scaffold_text_and_has_the_chat_framing(shipped):
    from agent.scaffold import ChatFormat, system_prompt, task_prompt
    from agent.scaffold.chat import TextCodec

    _, tokenizer = shipped
    codec = TextCodec(tokenizer)
    texts = [system_prompt(), task_prompt("`f()` in `pkg/m.py` returns 1 \u2014 expected 2 \u00e9"),
             '<function=str_replace>\n<parameter=path>a/b.py</parameter>\n<parameter=old>    x = {y!r:>5}\t</parameter>\n'
             "<parameter=new>\n\n</parameter>\n</function>", "geometry.py-12-    return lerp(b, a, fraction)"]
    for text in texts:
        assert codec.decode(codec.encode(text)) == text
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.end_of_turn == "<|im_end|>\n"
    assert chat.stop_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert chat.observation_prefix == "<|im_end|>\n<|im_start|>user\n"
    assert chat.observation_suffix == "<|im_end|>\n<|im_start|>assistant\n"


@needs_asset
def test_model_greps_the_function_an_issue_names(shipped, tmp_path):
    """Greedy first turn on an unseen toy task: a well-formed bash call that greps the named function."""
    from agent.scaffold import build_prompt_ids, parse_tool_call
    from agent.toy import generate_suite

    model, tokenizer = shipped
    task = next(t for t in generate_suite(11, 6, 0, tmp_path / "toy") if t.metadata["difficulty"] == 1)
    ids = build_prompt_ids(tokenizer, task)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=end,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    call = parse_tool_call(text)
    function = task.metadata["buggy_function"].rsplit(".", 1)[-1]
    assert call.name == "bash" and call.arguments["command"] == f'grep -rn -A8 "def {function}("', text


# -- the data generator ----------------------------------------------------------------------------


def test_line_mutations_include_the_inverse_of_toy_bugs():
    cases = {"        if amount >= self.available():": "        if amount > self.available():",
             "    return sku": "    return cleaned",
             "    return ratio(len(word), count_vowels(word))": "    return ratio(count_vowels(word), len(word))",
             "    for _ in range(1, n):": "    for _ in range(n):",
             "    return a[0] * b[1] + a[1] * b[0]": "    return a[0] * b[1] - a[1] * b[0]"}
    for buggy, fixed in cases.items():
        variants = [v for _, v in tp.line_mutations(buggy, ["sku", "cleaned"])]
        assert fixed in variants, (buggy, variants)
        assert fixed not in tp.wrong_mutations(buggy, ["sku", "cleaned"])[len(variants):]
    assert tp.line_mutations('    """A docstring < with > operators."""') == []


def test_line_edit_is_the_smallest_unique_whole_line_replacement():
    buggy = "def f(xs):\n    total = 0\n    return total\n\n\ndef g(xs):\n    total = 0\n    return xs\n"
    fixed = buggy.replace("    return xs\n", "    return total\n")
    assert tp.line_edit(buggy, fixed) == ("    return xs", "    return total")
    inserted = buggy.replace("def g(xs):\n", "def g(xs):\n    if not xs:\n        return 0\n")
    old, new = tp.line_edit(buggy, inserted)
    assert buggy.count(old) == 1 and buggy.replace(old, new) == inserted


@pytest.fixture(scope="module")
def small_sites(tmp_path_factory):
    from agent.toy import generate_suite

    tasks = generate_suite(5, 6, 0, tmp_path_factory.mktemp("toy"))
    rng = random.Random(0)
    synthetic = tp.synthetic_sites(["ledger"], rng, per_line=1)[:4]
    return tp.real_sites(tasks) + [tp.synthetic_site_files(t, s, rng, i) for i, (t, s) in enumerate(synthetic)]


def test_mixture_has_the_fix_and_wrong_moves_and_only_the_fix_fixes(small_sites):
    moves: dict[str, int] = {}
    for k in range(400):
        site = small_sites[k % len(small_sites)]
        turns, move = tp.plan_episode(site, random.Random(k))
        moves[move] = moves.get(move, 0) + 1
        edits = [t for t in turns if "<function=str_replace>" in t]
        assert turns[-1].endswith("<function=submit>\n</function>")
        if move == "fix":
            assert edits == ["Fix it.\n" + tp._call("str_replace", path=site.buggy_file, old=site.old, new=site.new)]
        elif move == "no_edit":
            assert edits == []
        elif move == "wrong_locate":  # grepped another function: edits in it, if any, miss the bug
            assert len(edits) <= 1 and all(f"<parameter=old>{site.old}</parameter>" not in e for e in edits)
        else:
            assert len(edits) == 1 and f"<parameter=new>{site.new}</parameter>" not in edits[0]
    assert set(moves) == {"fix", "no_edit", "same_line", "other_line", "wrong_locate"}, moves
    assert 0.3 < moves["fix"] / 400 < 0.65, moves


def test_data_is_token_exact_scaffold_episodes_and_deterministic(small_sites):
    from agent.scaffold import build_prompt_ids
    from agent.scaffold.chat import ChatFormat
    from runtime.records import Task

    from agent.fakes import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=600)
    a = tp.generate_data(small_sites[:4], tokenizer, episodes_per_site=2, seed=3)
    b = tp.generate_data(small_sites[:4], tokenizer, episodes_per_site=2, seed=3)
    c = tp.generate_data(small_sites[:4], tokenizer, episodes_per_site=2, seed=4)
    assert [(s.ids, s.loss_mask, s.move) for s in a] == [(s.ids, s.loss_mask, s.move) for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]
    site, sample = small_sites[0], a[0]
    task = Task(id="x", repo="/r", base_commit="0" * 40, problem_statement=site.issue, image="host", test_patch="",
                FAIL_TO_PASS=["t::t"], PASS_TO_PASS=[], test_command="true", log_parser="pytest")
    prompt = build_prompt_ids(tokenizer, task, "/testbed")
    assert sample.ids[:len(prompt)] == prompt and not any(sample.loss_mask[:len(prompt)])
    text = tokenizer.decode(sample.ids, skip_special_tokens=False)
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert text.count(chat.observation_suffix) == sample.turns  # the prompt, then each observation but the submit's
    trained = tokenizer.decode([t for t, m in zip(sample.ids, sample.loss_mask) if m], skip_special_tokens=False)
    assert trained.count("<|im_end|>") == sample.turns and "grep -rn -A8" in trained
    assert f"{site.buggy_file}:" in text  # the real grep output of the episode is in the observation


def test_renamed_sites_are_consistent_and_fresh(small_sites):
    """Fresh names everywhere at once: the buggy file's path, the function, the edit and the issue agree."""
    changed = 0
    for k, site in enumerate(small_sites):
        r = tp.rename_site(site, random.Random(k))
        text = r.files[r.buggy_file]
        assert text.count(r.old) == 1 and r.old != r.new
        assert f"def {r.function}(" in text and f"def {r.entry_function}(" in "\n".join(r.files.values())
        assert len(r.files) == len(site.files)
        if r is not site:
            changed += 1
            assert r.buggy_file != site.buggy_file and r.function != site.function
            assert f"def {site.function}(" not in "\n".join(r.files.values()) and f"{site.function}()" not in r.issue
        assert tp.rename_site(site, random.Random(k)) == r  # deterministic for its generator
    assert changed >= len(small_sites) - 1


def test_renaming_in_the_data_is_deterministic_and_changes_every_episode(small_sites):
    from agent.fakes import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=600)
    a = tp.generate_data(small_sites[:3], tokenizer, episodes_per_site=2, seed=1, rename=1.0)
    b = tp.generate_data(small_sites[:3], tokenizer, episodes_per_site=2, seed=1, rename=1.0)
    plain = tp.generate_data(small_sites[:3], tokenizer, episodes_per_site=2, seed=1)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert len(a) == len(plain) and all(x.ids != y.ids for x, y in zip(a, plain))
    assert {s.move for s in a} <= {"fix", "no_edit", "same_line", "other_line", "wrong_locate"}


def test_copy_samples_repeat_lines_shown_after_the_shared_prefix(small_sites):
    from agent.fakes import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=600)
    prefix = tokenizer.encode("<|im_start|>system\nS<|im_end|>\n")
    samples = tp.copy_samples(small_sites, tokenizer, 6, seed=0, prefix_ids=prefix)
    assert samples == tp.copy_samples(small_sites, tokenizer, 6, seed=0, prefix_ids=prefix)
    for sample in samples:
        assert sample.ids[:len(prefix)] == prefix and not any(sample.loss_mask[:len(prefix)])
        start = sample.loss_mask.index(1)
        assert all(sample.loss_mask[start:])
        shown = tokenizer.decode(sample.ids[:start], skip_special_tokens=False)
        copied = tokenizer.decode(sample.ids[start:], skip_special_tokens=False).removesuffix("<|im_end|>")
        assert all(line in shown for line in copied.split("\n"))


def test_action_accuracy_counts_action_tokens_and_turns():
    from agent.fakes import tiny_tokenizer
    from learner.tiny import tiny_model

    tokenizer = tiny_tokenizer(vocab_size=600)
    model = tiny_model(tokenizer)
    sample = tp.Sample(ids=list(range(10, 70)), loss_mask=[0] * 5 + [1] * 3 + [0] * 5 + [1] * 45 + [0] * 2,
                       move="fix", task_id="t", turns=2)
    acc = tp.action_accuracy(model, [sample])
    assert set(acc) == {"token_acc", "short_turn_exact", "long_turn_exact"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_shared_prefix_forward_equals_a_plain_forward():
    from agent.fakes import tiny_tokenizer
    from learner.tiny import tiny_model

    tokenizer = tiny_tokenizer(vocab_size=600)
    model = tiny_model(tokenizer, init_std=0.3)
    rng = random.Random(0)
    prefix = [rng.randrange(len(tokenizer)) for _ in range(40)]
    rows = [prefix + [rng.randrange(len(tokenizer)) for _ in range(n)] for n in (25, 60, 5)]
    samples = [tp.Sample(r, [0] * len(r), "fix", "t", 1) for r in rows]
    assert tp.common_prefix(samples) == 40
    width = max(map(len, rows))
    ids = torch.zeros((3, width), dtype=torch.long)
    attn = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        plain, shared = tp.hidden_states(model, ids, attn, 0), tp.hidden_states(model, ids, attn, 40)
    assert torch.allclose(plain * attn[..., None], shared * attn[..., None], atol=1e-4)
    assert not torch.allclose(plain, tp.hidden_states(model, ids.roll(1, dims=1), attn, 0), atol=1e-3)


def test_induction_warmup_runs_and_reports():
    from agent.fakes import tiny_tokenizer
    from learner.tiny import tiny_model

    model = tiny_model(tiny_tokenizer(vocab_size=600))
    out = tp.induction_warmup(model, 3, rows=4)
    assert out["induction_steps"] == 3.0 and 0.0 <= out["induction_final_acc"] <= 1.0 and not model.training
