"""Run by tests/test_multinode.py in its own process: one run on a Ray cluster of three raylets on
127.0.0.1 that grows and loses a node mid-run. The head node (driver, coordinator) offers no CPUs,
so heads run on worker nodes only: at first on node "a", with room for 2 of the run's 4 heads (the
other 2 wait for resources); node "b" is added at round 3, with room for 4 (the waiting heads
start there); once they have trained, node "a" is killed (its heads are lost and replaced on "b").
Prints one JSON line of what happened."""

import json
import os
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lte_ray.bench.chaos_faults import ensure_auth_token  # noqa: E402
from lte_ray.resolve import build_config  # noqa: E402
from lte_ray.runtime.launch import train  # noqa: E402

NAME = "multinode-test"
# A dead raylet is noticed in about 3 s instead of 15 (Ray's default health checks: 5 x 3 s).
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

ensure_auth_token()  # a fresh machine has no token yet; Cluster does not make one
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
nodes = {"a": cluster.add_node(num_cpus=1)}
try:
    ray.init(address=cluster.address, namespace="lte-ray", log_to_driver=False)
    cfg = build_config({}, {"model.depth": 1, "model.width": 32, "model.attn_heads": 2, "lte.heads": 4,
                            "lte.rank": 4, "lte.merge_every": 2, "train.rounds": int(sys.argv[2]),
                            "train.batch_size": 16, "lte.quant": "none", "ray.cpus_per_head": 0.5,
                            "ray.start_grace_s": 1, "train.eval_every": 50})
    seen: dict = {"events": []}

    def heads_by_node() -> dict[str, list[int]]:
        infos = ray.get(ray.get_actor(NAME, namespace="lte-ray").workers.remote())
        names = {n.node_id: k for k, n in nodes.items()}
        out: dict[str, list[int]] = {}
        for hid, info in sorted(infos.items()):
            out.setdefault(names.get(info["node_id"], "?"), []).append(hid)
        return out

    def on_round(rec):
        if rec.round == 1:
            seen["start"] = heads_by_node()
        if rec.round == 3 and "b" not in nodes:
            nodes["b"] = cluster.add_node(num_cpus=2)
            seen["events"].append(f"round {rec.round}: node b added")
        elif "b" in nodes and "killed" not in seen and rec.active_heads == 4:
            seen["before_kill"] = heads_by_node()
            seen["four_heads_round"] = rec.round
            cluster.remove_node(nodes["a"], allow_graceful=False)  # SIGKILL of its raylet and workers
            seen["killed"] = rec.round
            seen["events"].append(f"round {rec.round}: node a killed")
        elif "killed" in seen and "replaced" not in seen and len(rec.head_losses) == 4 \
                and set(rec.head_losses).isdisjoint(seen["before_kill"]["a"]):
            seen["replaced"] = rec.round
            seen["after"] = heads_by_node()

    t0 = time.monotonic()
    result = train(cfg, run_name=NAME, output_dir=sys.argv[1], on_round=on_round)
    print(json.dumps({**seen, "rounds": result.rounds, "seconds": round(time.monotonic() - t0, 1),
                      "counters": vars(result.counters), "last_heads": sorted(result.history[-1].head_losses),
                      "last_round_heads": len(result.history[-1].head_losses)}))
finally:
    ray.shutdown()
    cluster.shutdown()
