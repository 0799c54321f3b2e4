"""The scaffold: tool-call parsing, tools on a real repository, and token-exact episodes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import trio

from agent.scaffold import (
    ChatFormat,
    EpisodeConfig,
    FormatError,
    PromptEncoder,
    ToolCall,
    Tools,
    build_prompt_ids,
    build_prompts,
    parse_tool_call,
    render_prompts,
    run_episode,
    system_prompt,
    task_prompt,
)
from agent.scaffold.chat import TextCodec
from agent.workspace import LocalWorkspace
from runtime.records import FinishReason, Task, Trajectory

# --- parsing ---------------------------------------------------------------------------------------


def test_function_format_with_multiline_values():
    text = ("I will fix the operator.\n<function=str_replace>\n<parameter=path>pkg/calc.py</parameter>\n"
            "<parameter=old>\n    return a - b\n</parameter>\n<parameter=new>    return a + b</parameter>\n</function>")
    assert parse_tool_call(text) == ToolCall("str_replace", {"path": "pkg/calc.py", "old": "    return a - b",
                                                             "new": "    return a + b"}, "function")


def test_hermes_format_and_first_call_wins():
    text = ('<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}\n</tool_call>'
            "<function=submit>\n</function>")
    assert parse_tool_call(text) == ToolCall("bash", {"command": "ls -la"}, "hermes")
    assert parse_tool_call('<tool_call>{"name": "view", "arguments": "{\\"path\\": \\"a\\"}"}</tool_call>').arguments == {"path": "a"}


def test_call_cut_at_the_stop_sequence_is_completed():
    assert parse_tool_call("<function=bash>\n<parameter=command>pytest -q</parameter>\n") == ToolCall(
        "bash", {"command": "pytest -q"}, "function")


def test_int_parameters_are_converted():
    call = parse_tool_call("<function=view><parameter=path>a.py</parameter><parameter=start_line> 3</parameter></function>")
    assert call.arguments == {"path": "a.py", "start_line": 3}


@pytest.mark.parametrize(
    "text, message",
    [
        ("Let me think about it.", "No tool call found"),
        ("<function=rm_rf><parameter=path>/</parameter></function>", "Unknown tool 'rm_rf'"),
        ("<function=bash></function>", "missing the parameter 'command'"),
        ("<function=bash><parameter=cmd>ls</parameter></function>", "has no parameter 'cmd'"),
        ("<function=view><parameter=path>a</parameter><parameter=start_line>x</parameter></function>", "whole number"),
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name"'),
        ("<function=bash><parameter=command>ls</parameter><parameter=command>pwd</parameter></function>", "given twice"),
    ],
)
def test_malformed_calls_explain_themselves(text, message):
    with pytest.raises(FormatError, match=message):
        parse_tool_call(text)


def test_unclosed_parameter_is_a_format_error_even_after_complete_ones():
    text = "<function=bash><parameter=command>ls</parameter><parameter=command>pwd</function>"
    with pytest.raises(FormatError, match="not closed"):
        parse_tool_call(text)
    ok = parse_tool_call("<function=bash><parameter=command>echo '<parameter=x>'</parameter></function>")
    assert ok.arguments == {"command": "echo '<parameter=x>'"}


def test_codec_cache_gives_the_tokenizers_ids_and_stays_bounded(tiny_tokenizer):
    codec = TextCodec(tiny_tokenizer, cache_chars=40)
    text = "ok\n[exit code 1]"
    first = codec.encode(text)
    assert first == tiny_tokenizer.encode(text, add_special_tokens=False)
    first.append(0)  # the caller owns what it gets
    assert codec.encode(text) == tiny_tokenizer.encode(text, add_special_tokens=False)
    assert (codec.hits, codec.misses) == (1, 1)
    for i in range(10):
        codec.encode(f"line {i} of some output")  # 22 characters each: the oldest are forgotten
    assert sum(map(len, codec._cache)) <= 40 and text not in codec._cache
    codec.encode("x" * 41)  # longer than the whole cache: not kept
    assert "x" * 41 not in codec._cache


# --- tools -----------------------------------------------------------------------------------------


async def test_tools_on_a_repository(toy_repo):
    repo, _ = toy_repo
    tools = Tools(LocalWorkspace(repo), bash_timeout_s=0.5, max_observation_chars=2000)
    out = await tools.run(ToolCall("bash", {"command": "grep -n 'a - b' pkg/calc.py"}))
    assert out.observation == "2:    return a - b" and not out.failed
    out = await tools.run(ToolCall("bash", {"command": "exit 3"}))
    assert out.failed and "[exit code 3]" in out.observation
    out = await tools.run(ToolCall("bash", {"command": "sleep 5"}))
    assert out.failed and "timed out" in out.observation
    out = await tools.run(ToolCall("bash", {"command": "yes | head -c 100000"}))
    assert len(out.observation) < 2200 and "omitted" in out.observation
    out = await tools.run(ToolCall("bash", {"command": "printf '\\377\\376ok'"}))
    assert out.observation.endswith("ok")  # undecodable bytes replaced, not a crash

    out = await tools.run(ToolCall("view", {"path": "pkg/calc.py", "start_line": 2, "end_line": 2}))
    assert out.observation == "2\t    return a - b"
    out = await tools.run(ToolCall("view", {"path": "pkg"}))
    assert "pkg/calc.py" in out.observation and ".git" not in out.observation
    out = await tools.run(ToolCall("view", {"path": "nope.py"}))
    assert out.failed and "no such file" in out.observation

    out = await tools.run(ToolCall("str_replace", {"path": "pkg/calc.py", "old": "return a", "new": "return b"}))
    assert out.failed and "occurs 2 times in pkg/calc.py (lines 2, 6)" in out.observation
    out = await tools.run(ToolCall("str_replace", {"path": "pkg/calc.py", "old": "a + b", "new": "x"}))
    assert out.failed and "No exact match" in out.observation
    out = await tools.run(ToolCall("str_replace", {"path": "pkg/calc.py", "old": "a - b", "new": "a + b"}))
    assert not out.failed and "return a + b" in out.observation
    assert (repo / "pkg" / "calc.py").read_text().startswith("def add(a, b):\n    return a + b\n")

    out = await tools.run(ToolCall("create", {"path": "pkg/calc.py", "content": "x"}))
    assert out.failed and "already exists" in out.observation
    out = await tools.run(ToolCall("create", {"path": "pkg/new.py", "content": "X = 1"}))
    assert (repo / "pkg" / "new.py").read_text() == "X = 1\n"
    assert (await tools.run(ToolCall("submit", {}))).submitted


# --- episodes --------------------------------------------------------------------------------------


@dataclass
class Reply:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"


@dataclass
class ScriptedSampler:
    """Returns scripted texts as token ids, recording every prompt it was sent."""

    tokenizer: object
    texts: list[str]
    char_level: bool = False  # tokenise character by character: a non-canonical tokenisation
    prompts: list[list[int]] = field(default_factory=list)
    delay_s: float = 0.0

    async def complete(self, prompt_ids, *, max_tokens, stop, stop_token_ids):
        self.prompts.append(list(prompt_ids))
        if self.delay_s:
            await trio.sleep(self.delay_s)
        text = self.texts[min(len(self.prompts) - 1, len(self.texts) - 1)]
        if self.char_level:
            ids = [i for ch in text for i in self.tokenizer.encode(ch, add_special_tokens=False)]
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = ids[:max_tokens - 1] + [stop_token_ids[0]]  # the sampler stops on the end-of-turn token
        return Reply(ids, [-0.25] * len(ids))


def make_task(commit: str) -> Task:
    return Task(id="toy-1", repo="toy/calc", base_commit=commit, problem_statement="add(2, 3) returns -1 instead of 5.",
                image="host", test_patch="", FAIL_TO_PASS=["tests/test_calc.py::test_add"], PASS_TO_PASS=[],
                test_command="pytest -rA", log_parser="pytest")


async def test_a_prompt_checked_by_the_caller_is_copied_not_checked_again(toy_repo, tiny_tokenizer):
    repo, commit = toy_repo
    chat = ChatFormat.from_tokenizer(tiny_tokenizer)
    prompt = Trajectory.check_prompt_ids(build_prompt_ids(tiny_tokenizer, make_task(commit), str(repo)))
    runs = []
    for checked in (False, True):
        traj = await run_episode(make_task(commit), LocalWorkspace(repo), ScriptedSampler(tiny_tokenizer, FIX),
                                 tiny_tokenizer, chat, episode_id="e1", group_id="g1", prompt_ids=prompt,
                                 prompt_checked=checked)
        assert traj.prompt_ids == prompt and traj.prompt_ids is not prompt  # the record owns its list
        runs.append((traj.token_ids(), traj.loss_mask(), [t.tool for t in traj.turns], traj.patch, traj.finish_reason))
        await LocalWorkspace(repo).exec("git checkout -q -- .")
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match=r"^Trajectory\.prompt_ids\[1\]: token id must be >= 0"):
        await run_episode(make_task(commit), LocalWorkspace(repo), ScriptedSampler(tiny_tokenizer, FIX), tiny_tokenizer,
                          chat, episode_id="e1", group_id="g1", prompt_ids=[1, -1])


async def test_a_diff_past_its_timeout_raises_too_slow(toy_repo, tiny_tokenizer, autojump_clock):
    repo, commit = toy_repo

    async def hang(base_commit):
        await trio.sleep_forever()

    sampler = ScriptedSampler(tiny_tokenizer, ["<function=submit>\n</function>"])
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError, match=r"the diff took longer than 5 s"):
        await run_episode(make_task(commit), LocalWorkspace(repo), sampler, tiny_tokenizer,
                          ChatFormat.from_tokenizer(tiny_tokenizer), EpisodeConfig(diff_timeout_s=5.0),
                          episode_id="e", group_id="g", diff=hang)
    assert trio.current_time() - start == pytest.approx(5.0)


class SkewedBackend:
    """A backend that encodes a text differently alone than inside a longer one (an extra id 0 in
    front of a text that does not start the conversation, where its `trigger` is in it): a tokenizer
    for which cutting a prompt after its system message is not exact."""

    def __init__(self, backend, trigger: str = "") -> None:
        self.backend, self.trigger = backend, trigger

    def encode_batch(self, texts, **kwargs):
        out = self.backend.encode_batch(texts, **kwargs)
        return [Skewed([0, *e.ids]) if self.trigger in t and not t.startswith("<|im_start|>system") else e
                for t, e in zip(texts, out)]

    def __getattr__(self, name):
        return getattr(self.backend, name)


@dataclass
class Skewed:
    ids: list


class SkewedTokenizer:
    def __init__(self, tokenizer, trigger: str = "") -> None:
        self.tokenizer = tokenizer
        self.backend_tokenizer = SkewedBackend(tokenizer.backend_tokenizer, trigger)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def varied_tasks(n: int) -> list[tuple[Task, str]]:
    return [(dataclasses.replace(make_task("HEAD"), id=f"t{i}", problem_statement=f"Case {i}: é ü <|x|>\n  task number {i}"),
             f"/w{i % 3}") for i in range(n)]


def test_prompt_encoder_encodes_the_system_message_once_and_exactly(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer)
    assert encoder.prefix.startswith("<|im_start|>system") and encoder.prefix.endswith("<|im_end|>\n")
    assert encoder.prefix_ids == list(tiny_tokenizer.encode(encoder.prefix, add_special_tokens=False))
    tasks = varied_tasks(7)
    texts = render_prompts(tiny_tokenizer, tasks)
    assert encoder.encode(texts) == build_prompts(tiny_tokenizer, tasks)
    assert all(encoder.check(text) for text in texts)
    # A text that does not start with the prefix is encoded whole.
    assert encoder.encode(["plain text", *texts[:1]]) == [list(tiny_tokenizer.encode("plain text", add_special_tokens=False)),
                                                        *build_prompts(tiny_tokenizer, tasks[:1])]


def test_prompt_encoder_encodes_whole_where_cutting_is_not_exact(tiny_tokenizer):
    skewed = SkewedTokenizer(tiny_tokenizer)  # wrong on the probes already: no cut from the start
    encoder = PromptEncoder(skewed)
    assert encoder.prefix == "" and encoder.prefix_ids == []
    texts = render_prompts(tiny_tokenizer, varied_tasks(3))
    assert encoder.encode(texts) == build_prompts(tiny_tokenizer, varied_tasks(3))
    late = PromptEncoder(SkewedTokenizer(tiny_tokenizer, trigger="task number"))  # right on the probes only
    assert late.prefix and not late.check(texts[0])
    late.disable()
    assert late.encode(texts) == build_prompts(tiny_tokenizer, varied_tasks(3))


def _tokenizer_family(kind: str):
    """A small tokenizer of another family than the byte-level BPE: sentencepiece-style Metaspace
    (prefix space on the first piece or on every one), a normalizing one (NFKC, lowercase), and one
    whose turn marker eats the whitespace around it (lstrip/rstrip)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from agent.fakes import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    alphabet: list[str] = []
    if kind.startswith("metaspace"):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.split("-")[1])
        tok.decoder = decoders.Metaspace(prepend_scheme=kind.split("-")[1])
    elif kind == "stripping":  # byte-level: the newline the turn marker eats is a token of its own alone
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "normalized":
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    specials = ["<unk>", "<|endoftext|>", "<|im_end|>"] + ([] if kind == "stripping" else ["<|im_start|>"])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=specials, initial_alphabet=alphabet)
    corpus = [system_prompt(), task_prompt("add() subtracts.", "/testbed")]
    tok.train_from_iterator(corpus * 10, trainer)
    if kind == "stripping":
        tok.add_special_tokens([AddedToken("<|im_start|>", special=True, lstrip=True, rstrip=True)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>")
    hf.chat_template = CHATML_TEMPLATE
    return hf


@pytest.mark.parametrize(("kind", "cut"), [("metaspace-first", True), ("metaspace-always", True), ("normalized", True),
                                          ("stripping", False)])
def test_prompt_encoder_is_exact_or_whole_for_other_tokenizer_families(kind, cut):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizer = _tokenizer_family(kind)
    encoder = PromptEncoder(tokenizer)
    # Where the turn marker eats the newline before it, the prompt cut there encodes otherwise: the
    # probes show it, and prompts are encoded whole.
    assert bool(encoder.prefix) is cut
    pieces = st.sampled_from(list("aZé ü\n\t _-<|>") + ["<|im_start|>", "<|im_end|>", "def f():", "  "])
    statements = st.lists(pieces, max_size=20).map("".join)

    @settings(max_examples=40, deadline=None)
    @given(statements, st.sampled_from(["/testbed", "/w x", "/é"]))
    def check(statement, workdir):
        task = (dataclasses.replace(make_task("HEAD"), problem_statement=statement or "x"), workdir)
        texts = render_prompts(tokenizer, [task])
        whole = [list(tokenizer.encode(texts[0], add_special_tokens=False))]
        assert encoder.encode(texts) == whole == build_prompts(tokenizer, [task])

    check()


def test_prompts_built_as_a_batch_equal_those_built_one_at_a_time(tiny_tokenizer):
    tasks = [(dataclasses.replace(make_task("HEAD"), id=f"t{i}", problem_statement=f"Case {i}: 1 + 1 == {i}\n  é"),
              f"/w{i % 2}") for i in range(5)]
    batch = build_prompts(tiny_tokenizer, tasks)
    alone = [list(tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt()}, {"role": "user", "content": task_prompt(t.problem_statement, w)}],
        tokenize=False, add_generation_prompt=True), add_special_tokens=False)) for t, w in tasks]
    assert batch == alone and [build_prompt_ids(tiny_tokenizer, t, w) for t, w in tasks] == alone
    assert all(type(ids) is list for ids in batch) and len({tuple(ids) for ids in batch}) == 5
    assert build_prompts(tiny_tokenizer, []) == []


FIX = ["Let me look.\n<function=view>\n<parameter=path>pkg/calc.py</parameter>\n</function>",
       "<function=str_replace>\n<parameter=path>pkg/calc.py</parameter>\n<parameter=old>a - b</parameter>\n"
       "<parameter=new>a + b</parameter>\n</function>",
       "no call here, sorry",
       "<function=submit>\n</function>"]


@pytest.mark.parametrize(("spoil", "error", "message"), [
    (lambda ids, lps: (ids + [-1], lps + [-0.5]), ValueError, r"^Turn\.action_ids\[\d+\]: token id must be >= 0"),
    (lambda ids, lps: (ids, lps[:-1] + [float("nan")]), ValueError, r"^Turn\.action_logprobs\[\d+\]: logprob must be finite"),
    (lambda ids, lps: (ids, lps[:-1]), ValueError, r"^Turn\.action_logprobs: length \d+ != len\(action_ids\)"),
])
async def test_a_bad_sampler_reply_fails_the_episode_before_its_tool_runs(toy_repo, tiny_tokenizer, spoil, error, message):
    """The sampler's reply is checked as it arrives (as `Turn` checks it), not after its tool call ran."""
    repo, commit = toy_repo
    ran = []

    class Workspace(LocalWorkspace):
        async def exec(self, *args, **kwargs):
            ran.append(args)
            return await super().exec(*args, **kwargs)

    class BadSampler:
        async def complete(self, prompt_ids, *, max_tokens, stop, stop_token_ids):
            ids = tiny_tokenizer.encode("<function=bash>\n<parameter=command>ls</parameter>\n</function>",
                                        add_special_tokens=False) + [stop_token_ids[0]]
            return Reply(*spoil(ids, [-0.5] * len(ids)))

    with pytest.raises(error, match=message):
        await run_episode(make_task(commit), Workspace(repo), BadSampler(), tiny_tokenizer,
                          ChatFormat.from_tokenizer(tiny_tokenizer), episode_id="e1", group_id="g1")
    assert ran == []


@pytest.mark.parametrize("char_level", [False, True], ids=["canonical", "non_canonical"])
async def test_episode_is_token_exact(toy_repo, tiny_tokenizer, char_level):
    repo, commit = toy_repo
    chat = ChatFormat.from_tokenizer(tiny_tokenizer)
    sampler = ScriptedSampler(tiny_tokenizer, FIX, char_level=char_level)
    traj = await run_episode(make_task(commit), LocalWorkspace(repo), sampler, tiny_tokenizer, chat,
                             episode_id="e1", group_id="g1", policy_version=7)
    assert traj.finish_reason == FinishReason.SUBMITTED
    assert [t.tool for t in traj.turns] == ["view", "str_replace", "", "submit"]
    assert [t.format_error for t in traj.turns] == [False, False, True, False]
    assert traj.metrics["format_errors"] == 1.0
    assert "-    return a - b" in traj.patch and "+    return a + b" in traj.patch
    # What the sampler saw at each turn is exactly the stored sequence up to that point.
    ids = traj.token_ids()
    for prompt in sampler.prompts:
        assert ids[: len(prompt)] == prompt
    assert sampler.prompts[0] == traj.prompt_ids == build_prompt_ids(tiny_tokenizer, make_task(commit), str(repo))
    # Model tokens are trained, the prompt and the observations are not.
    mask = traj.loss_mask()
    assert sum(mask) == sum(len(t.action_ids) for t in traj.turns)
    assert [ids[i] for i, m in enumerate(mask) if m] == [i for t in traj.turns for i in t.action_ids]
    # Storing and loading the episode changes nothing, even a tokenisation the tokenizer would not make.
    back = Trajectory.from_msgpack(traj.to_msgpack())
    assert back.token_ids() == ids and back.loss_mask() == mask
    decoded = tiny_tokenizer.decode(ids)
    reencoded = tiny_tokenizer.encode(decoded, add_special_tokens=False)
    if char_level:
        assert reencoded != ids  # re-tokenising would have changed what the model produced
    assert back.token_ids() == ids
    # The corrective observation reached the model.
    assert "No tool call found" in tiny_tokenizer.decode(traj.turns[2].observation_ids)


async def test_episode_limits(toy_repo, tiny_tokenizer):
    repo, commit = toy_repo
    chat = ChatFormat.from_tokenizer(tiny_tokenizer)
    ws = LocalWorkspace(repo)
    task = make_task(commit)
    looping = ["<function=bash>\n<parameter=command>true</parameter>\n</function>"]
    traj = await run_episode(task, ws, ScriptedSampler(tiny_tokenizer, looping), tiny_tokenizer, chat,
                             EpisodeConfig(max_turns=3), episode_id="e", group_id="g")
    assert traj.finish_reason == FinishReason.MAX_TURNS and len(traj.turns) == 3 and traj.patch == ""

    prompt_len = len(build_prompt_ids(tiny_tokenizer, task, ws.workdir))
    traj = await run_episode(task, ws, ScriptedSampler(tiny_tokenizer, looping), tiny_tokenizer, chat,
                             EpisodeConfig(max_context_tokens=prompt_len + 120, max_turns=50), episode_id="e", group_id="g")
    assert traj.finish_reason == FinishReason.CONTEXT_OVERFLOW
    assert len(traj.token_ids()) <= prompt_len + 120

    slow = ScriptedSampler(tiny_tokenizer, looping, delay_s=10)
    with trio.fail_after(5):
        traj = await run_episode(task, ws, slow, tiny_tokenizer, chat, EpisodeConfig(wall_time_s=0.2),
                                 episode_id="e", group_id="g")
    assert traj.finish_reason == FinishReason.TIMEOUT and traj.turns == []


async def test_tool_errors_about_the_request_become_observations(toy_repo, tiny_tokenizer):
    class Refusing(LocalWorkspace):
        async def write_file(self, path, data):
            from runtime.wire import BadRequest
            raise BadRequest("path escapes the sandbox", field="path")

    repo, commit = toy_repo
    chat = ChatFormat.from_tokenizer(tiny_tokenizer)
    sampler = ScriptedSampler(tiny_tokenizer, [
        "<function=create>\n<parameter=path>../../x</parameter>\n<parameter=content>x</parameter>\n</function>",
        "<function=submit>\n</function>"])
    traj = await run_episode(make_task(commit), Refusing(repo), sampler, tiny_tokenizer, chat, episode_id="e", group_id="g")
    assert traj.finish_reason == FinishReason.SUBMITTED
    assert "path escapes the sandbox" in tiny_tokenizer.decode(traj.turns[0].observation_ids)
