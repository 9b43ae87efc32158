"""Heads that the cluster cannot fit yet stay pending, and join once capacity appears (as when
the autoscaler adds a node): here a placement group holds CPUs and is then removed."""

import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group


def test_pending_head_joins_when_capacity_appears(ray_cluster, ray_cfg, tmp_path):
    from lte_ray.runtime.launch import train

    blocker = placement_group([{"CPU": 5}])  # of 8 CPUs, 3 stay free: two heads of 1.5 fit
    ray.get(blocker.ready())
    cfg = ray_cfg(**{"lte.heads": 3, "ray.min_heads": 2, "ray.cpus_per_head": 1.5, "ray.start_grace_s": 1.0,
                     "train.rounds": 300, "lte.quant": "none"})
    records, name, seen = [], f"test-{uuid.uuid4().hex[:8]}", {}

    def on_round(rec):
        records.append(rec)
        if rec.round == 1:
            seen["status"] = ray.get(ray.get_actor(name, namespace="lte-ray").status.remote())
        if rec.round == 3:
            remove_placement_group(blocker)  # capacity appears

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    assert records[0].active_heads == 2  # the run did not wait for the head it could not place
    assert seen["status"]["starting"] == [2], seen["status"]  # and says which one waits (it logs it too)
    grown = [r for r in records if r.active_heads == 3]
    assert grown, "the pending head never joined"
    assert result.counters.heads_joined == 1 and result.counters.heads_lost == 0
    after = records[records.index(grown[0]):]
    # it stays (a head late for the straggler grace may miss a round on a loaded machine)
    assert sum(r.active_heads == 3 for r in after) >= 0.9 * len(after)
    print(f"\npending head joined at round {grown[0].round}")
