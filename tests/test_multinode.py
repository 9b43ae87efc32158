"""Several Ray nodes (issue 12): raylets on 127.0.0.1 (`ray.cluster_utils.Cluster`), in their own
process (tests/multinode_script.py). One run grows by a node (its waiting heads start there) and
loses one (its heads are replaced on the other) and completes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode_script.py")
ROUNDS = 600


@pytest.fixture(scope="module")
def grown_then_shrunk(tmp_path_factory):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path_factory.mktemp("multinode")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(ROUNDS)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"events"')))
    print(f"\nmulti-node run: {seen}")
    return seen


@pytest.mark.slow
def test_heads_waiting_for_resources_start_on_a_node_added_mid_run(grown_then_shrunk):
    seen = grown_then_shrunk
    assert sorted(seen["start"]) == ["a"] and len(seen["start"]["a"]) == 2  # room for 2 of 4 heads
    assert len(seen["before_kill"]["b"]) == 2  # the 2 waiting heads started on the new node ...
    assert set(seen["before_kill"]["b"]).isdisjoint(seen["start"]["a"])
    assert seen["counters"]["heads_joined"] >= 2  # ... and joined the rounds


@pytest.mark.slow
def test_a_killed_nodes_heads_are_replaced_on_the_others_and_the_run_completes(grown_then_shrunk):
    seen = grown_then_shrunk
    assert seen["rounds"] == ROUNDS and "killed" in seen and "replaced" in seen
    lost = seen["before_kill"]["a"]
    assert seen["counters"]["heads_lost"] >= len(lost) == 2
    assert list(seen["after"]) == ["b"] and len(seen["after"]["b"]) == 4  # replacements on the surviving node
    assert set(lost).isdisjoint(seen["last_heads"]) and seen["last_round_heads"] == 4
