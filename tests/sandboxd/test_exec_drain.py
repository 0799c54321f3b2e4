"""An exec's output is never lost when the daemon's event loop is too busy to read it in time.

Regression: after the command exited, output still in the pipe when the 50 ms drain window closed was
dropped (exit 0, empty output): under load an episode's `git diff` came back empty, and a soak run's
read-after-restore found an empty file.
"""

from __future__ import annotations

import time

import pytest
import trio

from tests.sandboxd.conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]


async def test_output_survives_a_starved_event_loop(rt):
    sandbox = await rt.create("host")
    lost = []

    async def busy() -> None:  # like episodes tokenising big observations between awaits
        while True:
            time.sleep(0.006)
            await trio.lowlevel.checkpoint()

    async def one(i: int) -> None:
        result = await rt.exec(sandbox, f"printf hello-{i}", timeout_s=30)
        if result.output != f"hello-{i}".encode() or result.exit_code != 0:
            lost.append((i, result.output, result.exit_code))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(busy)
        async with trio.open_nursery() as inner:
            for i in range(40):
                inner.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert lost == []
    await rt.destroy(sandbox)
