"""`python -m learner.run` with a synthetic reward, for the loop tests (run as a script).

A random tiny model never resolves a toy task, so the execution reward would be 0 everywhere and
every DAPO group would be dropped. This reward depends on the episode's tokens only (how many model
tokens mod 7), so groups differ, advantages are nonzero and the loop trains; it is a pure function
of the trajectory, so a resumed run sees the same rewards as an uninterrupted one.
"""

from __future__ import annotations

import sys

import learner.rollouts


def token_count_reward(cfg):
    def reward(task, trajectory, report) -> float:
        return float(sum(len(t.action_ids) for t in trajectory.turns) % 7) / 6

    return reward


def main(argv: list[str]) -> None:
    learner.rollouts.make_reward_fn = token_count_reward
    from learner.run import main as run_main

    run_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
