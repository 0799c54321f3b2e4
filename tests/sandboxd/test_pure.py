"""Pure logic of sandboxd: output capping, path normalisation, image names, layer refcounts."""

import pytest
from hypothesis import given, strategies as st

from sandboxd.errors import CODES, BadRequest, LimitExceeded, NotFound, SandboxError
from sandboxd.files import sandbox_relpath
from sandboxd.layers import Layer, LayerStore, overlay_options, parse_image
from sandboxd.output import OutputCap


def test_output_cap_keeps_everything_under_the_cap():
    cap = OutputCap(10)
    cap.feed(b"abc")
    cap.feed(b"defghij")
    assert cap.output() == b"abcdefghij"
    assert not cap.truncated


@given(st.lists(st.binary(max_size=50), max_size=30), st.integers(min_value=0, max_value=64))
def test_output_cap_is_head_plus_tail(chunks, max_bytes):
    cap = OutputCap(max_bytes)
    for c in chunks:
        cap.feed(c)
    whole = b"".join(chunks)
    assert cap.total_bytes == len(whole)
    if len(whole) <= max_bytes:
        assert cap.output() == whole and not cap.truncated
    else:
        head, tail = max_bytes // 2, max_bytes - max_bytes // 2
        out = cap.output()
        assert cap.truncated
        assert out.startswith(whole[:head])
        assert out.endswith(whole[len(whole) - tail:]) if tail else True
        assert f"{len(whole) - max_bytes} bytes omitted".encode() in out


def test_output_cap_memory_is_bounded():
    cap = OutputCap(1000)
    for _ in range(10_000):
        cap.feed(b"y\n" * 4096)
    assert len(cap.output()) < 1100
    assert cap.total_bytes == 10_000 * 8192


@pytest.mark.parametrize("path,expected", [
    ("/etc/passwd", "etc/passwd"), ("a/b", "testbed/a/b"), ("/", ""), ("/testbed/../x", "x"),
    ("./a//b/.", "testbed/a/b"), ("..", ""),
])
def test_sandbox_relpath(path, expected):
    assert sandbox_relpath(path, "/testbed") == expected


@pytest.mark.parametrize("path", ["/../etc", "../../etc/passwd", "/a/../../b", "", "a\0b"])
def test_sandbox_relpath_refuses_escapes(path):
    with pytest.raises(BadRequest) as info:
        sandbox_relpath(path, "/testbed")
    assert info.value.field == "path" and info.value.code == "bad_request"


def test_parse_image():
    assert parse_image("host").kind == "host"
    assert parse_image("dir:/srv/x/").ref == "/srv/x"
    assert parse_image("podman:python:3.11").ref == "python:3.11"
    for bad in ["", "hostx", "dir:", "dir:relative", "docker:x", "dir:/a,b", None, 3]:
        with pytest.raises(BadRequest) as info:
            parse_image(bad)
        assert info.value.field == "image"


def test_overlay_options_page_limit():
    opts = overlay_options(["l/a", "l/b"], "u/1/u", "u/1/w")
    assert opts.startswith("lowerdir=l/a:l/b,upperdir=u/1/u,workdir=u/1/w")
    with pytest.raises(LimitExceeded) as info:
        overlay_options([f"u/{i:010d}/u" for i in range(400)], "u", "w")
    assert info.value.field == "snapshot"


def test_layer_store_collects_unused_layers():
    store = LayerStore()
    store.add(Layer("base", "l/base", pinned=True))
    store.add(Layer("s1", "u/1/u", mount="u/1"))
    store.acquire(("s1", "base"))  # a sandbox
    store.acquire(("s1", "base"))  # a snapshot
    assert store.release(("s1", "base")) == []
    dead = store.release(("s1", "base"))
    assert [layer.id for layer in dead] == ["s1"]
    assert "base" in store.layers and "s1" not in store.layers


def test_errors_carry_wire_codes_and_fields():
    err = NotFound("no sandbox 'x'", field="sandbox_id")
    assert isinstance(err, SandboxError)
    assert err.to_dict() == {"code": "not_found", "message": "no sandbox 'x'", "data": {"field": "sandbox_id"}}
    assert {cls.code for cls in SandboxError.__subclasses__()} == set(CODES)
