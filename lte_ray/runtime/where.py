"""Where the coordinator works: its device, and whether it sees the driver's output folder.

A coordinator that asks for GPUs may land on another node than the driver's (`runtime.launch`);
the driver then writes a fresh token into the output folder (`sign_output`), and the coordinator
reads it back (`output_problem`) before writing checkpoints there.
"""

from __future__ import annotations

import logging
import os
import secrets

import ray
import torch

from lte_ray.runtime.worker import assigned_cuda_device

log = logging.getLogger("lte_ray.coordinator")
OUTPUT_TOKEN = ".lte-ray-output-token"


def coordinator_device() -> torch.device:
    """The coordinator's device: the GPU Ray assigned it, if CUDA works there; else the CPU (with a
    warning when it asked for a GPU: the run still completes, slower)."""
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # num_gpus=0 no longer hides the node's GPUs
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("coordinator: Ray assigned GPU %s but CUDA is not usable here; merging on the CPU",
                    ",".join(gpu_ids))
        return torch.device("cpu")
    return assigned_cuda_device(gpu_ids)


def output_problem(output_dir: str, token: str | None) -> str | None:
    """Why this process cannot use the driver's output folder (it reads back the driver's token), or None."""
    if token is None:
        return None
    try:
        with open(os.path.join(output_dir, OUTPUT_TOKEN)) as f:
            if f.read() == token:
                return None
    except OSError:
        pass
    node = ray.get_runtime_context().get_node_id()[:12]
    return (f"output: the coordinator runs on node {node}, which does not see the driver's output folder "
            f"{output_dir}; put it on storage every node mounts (NFS, EFS, a shared volume)")


def sign_output(output: str) -> str:
    """Write a fresh token into the output folder: a coordinator on another node reads it back to
    prove it sees the same folder."""
    token = secrets.token_hex(16)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, OUTPUT_TOKEN), "w") as f:
        f.write(token)
    return token
