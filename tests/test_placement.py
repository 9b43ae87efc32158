"""Where a run's actors go on GPU clusters: a coordinator that asks for GPUs goes to a node that
has them (not the driver's), heads without GPUs see none, a head whose GPU CUDA cannot use stops
the run with one line, and a coordinator that cannot see the output folder says so. (A Tune
trial whose coordinator asks for a GPU: tests/test_tune.py.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lte_ray.errors import UserError
from lte_ray.runtime.launch import train
from lte_ray.runtime.where import OUTPUT_TOKEN, output_problem, sign_output

SCRIPT = Path(__file__).with_name("placement_script.py")


@pytest.mark.slow
def test_a_gpu_coordinator_goes_to_the_gpu_node_and_cpu_heads_see_no_gpu(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["rounds"] == 3
    assert seen["coordinator_node"] == seen["gpu_node"] != seen["driver_node"]
    assert len(seen["heads"]) == 2
    for info in seen["heads"].values():
        assert info["gpu_ids"] == [] and info["cuda_visible_devices"] == "" and info["device"] == "cpu"
    assert (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a GPU that CUDA cannot use: the test cluster's is fake")
def test_a_head_whose_gpu_cuda_cannot_use_stops_the_run_with_one_line(ray_cluster, ray_cfg, tmp_path):
    cfg = ray_cfg(**{"lte.heads": 1, "ray.gpus_per_head": 0.5, "train.device": "auto"})
    with pytest.raises(UserError, match="head 0: Ray assigned GPU 0 but CUDA is not usable here"):
        train(cfg, run_name="cuda-unusable", output_dir=str(tmp_path))


def test_a_coordinator_that_cannot_see_the_output_folder_says_so(ray_cluster, ray_cfg, tmp_path, monkeypatch):
    token = sign_output(str(tmp_path))
    assert (tmp_path / OUTPUT_TOKEN).read_text() == token
    assert output_problem(str(tmp_path), token) is None  # the same folder
    assert "does not see the driver's output folder" in output_problem(str(tmp_path / "elsewhere"), token)
    # a whole run: the coordinator reads another token than the driver wrote -> one line, no traceback
    import lte_ray.runtime.launch as launch

    monkeypatch.setattr(launch, "sign_output", lambda output: sign_output(output) + "-not-what-it-reads")
    with pytest.raises(UserError, match="put it on storage every node mounts"):
        train(ray_cfg(**{"ray.coordinator_gpus": 0.25}), run_name="output-unseen", output_dir=str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_local_run_asking_for_a_gpu_the_machine_lacks_stops_with_one_line(tmp_path):
    """The local cluster a run starts has only this machine's GPUs; waiting for one would never end."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "lte_ray.cli", "train", "--rounds", "2", "--output", str(tmp_path),
                           "--set", "ray.gpus_per_head=0.5"], capture_output=True, text=True, timeout=240, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lte-ray: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors == ["lte-ray: error: ray.gpus_per_head: 0.5 GPU asked for, but the local Ray cluster has 0 GPU "
                      "(Ray found none on this machine); set ray.gpus_per_head lower, or give ray.address of a "
                      "cluster with GPUs"]


@pytest.mark.parametrize("gpus, sets, problem", [
    (0.0, {"ray.coordinator_gpus": 0.1}, "ray.coordinator_gpus: 0.1 GPU asked for, but the local Ray cluster has 0"),
    (1.0, {"lte.heads": 4, "ray.gpus_per_head": 0.25, "ray.coordinator_gpus": 0.2},
     "4 heads at 0.25 GPU beside the coordinator's 0.2 do not fit on this machine's 1 GPU (Ray counts fractions "
     "per GPU; 3 fit)"),
    (1.0, {"lte.heads": 2, "ray.gpus_per_head": 0.6}, "2 heads at 0.6 GPU do not fit on this machine's 1 GPU"),
    (2.0, {"lte.heads": 2, "ray.gpus_per_head": 0.6}, None),
    (1.0, {"lte.heads": 4, "ray.gpus_per_head": 0.2, "ray.coordinator_gpus": 0.2}, None),
    (1.0, {"lte.heads": 4, "ray.gpus_per_head": 0.2, "ray.coordinator_gpus": 0.2, "ray.spare_heads": 1},
     "5 heads (spares included: ray.spare_heads=1) at 0.2 GPU beside the coordinator's 0.2 do not fit"),
    (2.0, {"lte.heads": 1, "ray.gpus_per_head": 2}, None),
    (0.0, {}, None)])
def test_gpu_requests_are_checked_against_the_local_cluster(tiny_cfg, monkeypatch, gpus, sets, problem):
    from lte_ray.runtime import launch

    monkeypatch.setattr(launch.ray, "cluster_resources", lambda: {"CPU": 2.0, **({"GPU": gpus} if gpus else {})})
    if problem is None:
        launch._check_local_gpus(tiny_cfg(**sets))
    else:
        with pytest.raises(UserError, match=re.escape(problem)):
            launch._check_local_gpus(tiny_cfg(**sets))
