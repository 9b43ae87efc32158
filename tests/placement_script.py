"""Run by tests/test_placement.py in its own process: a two-node Ray cluster on 127.0.0.1 (a head
node without GPUs, like cluster/aws.yaml's, and a node advertising one), and a run whose
coordinator asks for half a GPU. Prints one JSON line of where things ran."""

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lte_ray.bench.chaos_faults import ensure_auth_token  # noqa: E402
from lte_ray.resolve import build_config  # noqa: E402
from lte_ray.runtime.launch import train  # noqa: E402

ensure_auth_token()  # a fresh machine has no token yet; Cluster does not make one
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
try:
    ray.init(address=cluster.address, namespace="lte-ray", log_to_driver=False)
    cfg = build_config({}, {"model.depth": 1, "model.width": 32, "model.attn_heads": 2, "lte.heads": 2,
                            "lte.rank": 4, "lte.merge_every": 2, "train.rounds": 3, "train.batch_size": 16,
                            "ray.cpus_per_head": 0.5, "ray.coordinator_gpus": 0.5, "ray.coordinator_cpus": 0.5,
                            "ray.start_grace_s": 600})
    seen = {}

    def on_round(rec):
        if "status" not in seen:
            coord = ray.get_actor("placement-test", namespace="lte-ray")
            seen["status"] = ray.get(coord.status.remote())
            seen["workers"] = ray.get(coord.workers.remote())

    result = train(cfg, run_name="placement-test", output_dir=sys.argv[1], on_round=on_round)
    print(json.dumps({"driver_node": ray.get_runtime_context().get_node_id(), "gpu_node": gpu_node.node_id,
                      "coordinator_node": seen["status"]["node_id"], "coordinator_device": seen["status"]["device"],
                      "heads": {str(k): v for k, v in seen["workers"].items()}, "rounds": result.rounds}))
finally:
    ray.shutdown()
    cluster.shutdown()
