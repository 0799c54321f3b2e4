"""Config loading: TOML and overrides into nested dataclasses, errors that name the dotted key."""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.config import ConfigError, dump_config, load_config


class Backend(enum.Enum):
    NS = "ns"
    PODMAN = "podman"


@dataclass
class Optim:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip: tuple[float, ...] = (0.2, 0.28)


@dataclass
class Sandbox:
    backend: Backend = Backend.NS
    root: Path = Path("/testbed")
    limits: dict[str, int] = field(default_factory=dict)


@dataclass
class Run:
    name: str  # required
    steps: int = 10
    seed: int | None = None
    resume: bool = False
    mode: Literal["rft", "dapo"] = "dapo"
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    sandbox: Sandbox = field(default_factory=Sandbox)
    endpoints: dict[str, Optim] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def test_loads_a_toml_file_into_nested_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        """
        name = "smoke"
        seed = 7
        tags = ["a", "b"]
        [optim]
        lr = 3           # an int is a fine float
        [sandbox]
        backend = "podman"
        root = "/work/repo"
        limits = { memory_mb = 2048 }
        [endpoints.gpu0]
        lr = 2e-6
        """
    )
    run = load_config(Run, path)
    assert run == Run(
        name="smoke",
        seed=7,
        tags=["a", "b"],
        optim=Optim(lr=3.0),
        sandbox=Sandbox(backend=Backend.PODMAN, root=Path("/work/repo"), limits={"memory_mb": 2048}),
        endpoints={"gpu0": Optim(lr=2e-6)},
    )
    assert isinstance(run.optim.lr, float) and isinstance(run.sandbox.root, Path)


def test_overrides_are_toml_values_or_plain_strings() -> None:
    run = load_config(
        Run,
        {"name": "base", "optim": {"lr": 1.0}},
        ["optim.lr=3e-6", "steps = 5", "resume=true", "tags=[\"x\"]", "sandbox.root=/data/x",
         "name=1e3", "sandbox.limits.pids=64", "seed=12", "endpoints.a={lr=0.5}", "endpoints.a.clip=[0.1]"],
    )
    assert run.optim.lr == 3e-6 and run.steps == 5 and run.resume is True and run.tags == ["x"]
    assert run.sandbox.root == Path("/data/x")
    assert run.name == "1e3"  # a str field keeps the override's text
    assert run.sandbox.limits == {"pids": 64} and run.seed == 12
    assert run.endpoints == {"a": Optim(lr=0.5, clip=(0.1,))}


def test_overrides_do_not_modify_the_callers_mapping() -> None:
    source = {"name": "base", "optim": {"lr": 1.0}}
    load_config(Run, source, ["optim.lr=2.0"])
    assert source == {"name": "base", "optim": {"lr": 1.0}}


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"name": "x", "optim": {"lrr": 1}}, [], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"name": "x"}, ["sandbox.backnd=ns"], "unknown config key 'sandbox.backnd'; did you mean 'sandbox.backend'?"),
        ({"name": "x", "zzz": 1}, [], "unknown config key 'zzz'; known keys here: endpoints, mode,"),
        ({"name": "x", "endpoints": {"a": {"bad": 1}}}, [], "unknown config key 'endpoints.a.bad'"),
        ({}, [], "missing required config key 'name' (str)"),
        ({"name": "x", "steps": 1.5}, [], "config key 'steps': expected int, got 1.5 (float)"),
        ({"name": "x", "steps": True}, [], "config key 'steps': expected int, got True (bool)"),
        ({"name": "x"}, ["optim.lr=fast"], "config key 'optim.lr': expected float, got 'fast' (str, from override 'optim.lr=fast')"),
        ({"name": "x", "resume": "yes"}, [], "config key 'resume': expected bool, got 'yes' (str)"),
        ({"name": "x", "tags": ["a", 2]}, [], "config key 'tags[1]': expected str, got 2 (int)"),
        ({"name": "x", "seed": "7"}, [], "config key 'seed': expected int | None, got '7' (str)"),
        ({"name": "x", "mode": "ppo"}, [], "config key 'mode': expected one of 'rft', 'dapo', got 'ppo'"),
        ({"name": "x", "sandbox": {"backend": "docker"}}, [],
         "config key 'sandbox.backend': expected one of 'ns', 'podman', got 'docker'"),
        ({"name": "x", "sandbox": {"limits": {"mem": "1G"}}}, [],
         "config key 'sandbox.limits.mem': expected int, got '1G' (str)"),
        ({"name": "x", "optim": 3}, [], "optim: expected a table for Optim, got 3 (int)"),
        ({"name": "x", "steps": -1}, [], "config: steps must be >= 0, got -1"),
        ({"name": "x"}, ["steps"], "override 'steps': expected KEY=VALUE"),
        ({"name": "x"}, ["name.first=a"], "override 'name.first=a': 'name' is a value, not a table"),
    ],
)
def test_errors_name_the_dotted_key(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Run, data, overrides)
    assert message in str(info.value), str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/bad.toml: config key 'steps': expected int"):
        load_config(Run, path)
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Run, tmp_path / "missing.toml")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_config(Run, {})


def test_dump_config_reads_back_equal() -> None:
    run = Run(
        name='quote " back\\slash\nnewline\x7f',
        seed=None,
        tags=["a b", "ü"],
        optim=Optim(lr=float("inf"), betas=[], clip=(1e-300,)),
        sandbox=Sandbox(backend=Backend.PODMAN, root=Path("/x y"), limits={"has space": 1, "ok": -2}),
        endpoints={"gpu.0": Optim(lr=0.5)},
    )
    text = dump_config(run)
    assert "seed" not in text  # TOML has no null: None fields are left out
    assert load_config(Run, tomllib.loads(text)) == run


names = st.text(st.characters(codec="utf-8"), max_size=12)


@settings(deadline=None)
@given(
    name=names,
    steps=st.integers(0, 2**62),
    seed=st.none() | st.integers(-(2**62), 2**62),
    lr=st.floats(allow_nan=False),
    tags=st.lists(names, max_size=3),
    limits=st.dictionaries(names, st.integers(-(2**62), 2**62), max_size=3),
)
def test_any_config_round_trips_through_dump(
    name: str, steps: int, seed: int | None, lr: float, tags: list[str], limits: dict[str, int]
) -> None:
    run = Run(name=name, steps=steps, seed=seed, tags=tags, optim=Optim(lr=lr), sandbox=Sandbox(limits=limits))
    assert load_config(Run, tomllib.loads(dump_config(run))) == run
