"""`python -m learner.run` for bench/chaos.py, with an episode ledger (and optionally a synthetic reward).

The ledger is an append-only file of ``start``/``finish`` lines, one per scheduler episode, with this
process's pid: what the chaos report counts episodes from (a killed learner's in-memory counters die
with it). ``CHAOS_SYNTHETIC_REWARD=1`` replaces the reward with one that depends on the episode's
tokens only (number of model tokens mod 7), so a random tiny model still trains: the benchmark is
about surviving faults, not about learning.
"""

from __future__ import annotations

import json
import os
import sys
import time

# bench/ is sys.path[0] when this runs as a script, and bench/learner.py would shadow the package
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]


def main() -> None:
    ledger_path = os.environ["CHAOS_LEDGER"]
    ledger = open(ledger_path, "a", buffering=1)
    pid = os.getpid()

    def note(event: str, episode_id: str, **extra) -> None:
        ledger.write(json.dumps({"event": event, "episode": episode_id, "pid": pid, "t": time.time(), **extra}) + "\n")

    from agent.scheduler import Scheduler

    rollout = Scheduler.rollout

    async def logged_rollout(self, task, *, episode_id, group_id, policy_version=0):
        note("start", episode_id)
        result = await rollout(self, task, episode_id=episode_id, group_id=group_id, policy_version=policy_version)
        note("finish", episode_id, reason=str(getattr(result.trajectory.finish_reason, "value", "")),
             attempts=result.attempts, error=result.error)
        return result

    Scheduler.rollout = logged_rollout
    if os.environ.get("CHAOS_SYNTHETIC_REWARD") == "1":
        import learner.rollouts

        def token_reward(cfg):
            def reward(task, trajectory, report) -> float:
                return float(sum(len(t.action_ids) for t in trajectory.turns) % 7) / 6

            return reward

        learner.rollouts.make_reward_fn = token_reward
    from learner.run import main as run_main

    run_main(sys.argv[1:])


if __name__ == "__main__":
    main()
