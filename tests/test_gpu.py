"""CUDA paths, run with `pytest -m gpu` on a machine with an NVIDIA GPU (skipped without CUDA).

* Payloads: int8/NF4 broadcasts packed on the CPU and unpacked on CUDA, and packed on CUDA
  (the coordinator on a GPU) and unpacked on the CPU, hold the CPU path's values bit for bit.
* A head that keeps its main weights packed trains on CUDA as the dense head does.
* A Ray run on the GPU: heads sharing one GPU by fractions, the coordinator on it too; heads
  without a GPU share on that node stay on the CPU.
"""

import uuid

import pytest
import ray
import torch

from lte_ray.core import lora, quant
from lte_ray.core.head import Head
from lte_ray.core.master import MasterWeights
from lte_ray.data import load_data
from lte_ray.runtime.launch import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]

CUDA = torch.device("cuda")


def _weights(seed: int) -> dict[str, torch.Tensor]:
    """Fresh random main weights of odd sizes (blocks that end mid-tensor), a bias left plain."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(96, 40, generator=g), "b.weight": torch.randn(33, 70, generator=g) * 0.02,
            "c.weight": torch.randn(7, 9, generator=g) * 5, "a.bias": torch.randn(96, generator=g)}


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_payloads_cross_cpu_and_cuda_bit_for_bit(method):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh weights each run; a failure names its seed
    state = _weights(seed)
    keys = [k for k in state if k.endswith(".weight")]
    on_cpu = quant.pack(state, keys, method)
    on_gpu = quant.pack({k: v.to(CUDA) for k, v in state.items()}, keys, method)  # a coordinator on a GPU
    # the CUDA quantizer writes the CPU one's codes; int8's block scales too. NF4's double-quantized
    # statistics are not bit-equal: their offset is a mean, whose float sum runs in another order on
    # the GPU. What matters is below: a payload decodes to the same weights on either device.
    assert torch.equal(on_gpu.quantized.codes, on_cpu.quantized.codes)
    assert on_gpu.quantized.stats.keys() == on_cpu.quantized.stats.keys()
    if method == "int8":
        assert torch.equal(on_gpu.quantized.stats["absmax"], on_cpu.quantized.stats["absmax"])
    for broadcast in (on_cpu, on_gpu):
        reference = quant.unpack(broadcast, "cpu")  # the CPU path
        for device in ("cpu", CUDA):
            dense = quant.unpack(broadcast, device)
            packed = quant.packed_weights(broadcast, device)
            for k in state:
                assert torch.equal(dense[k].cpu(), reference[k]), (method, k, device, seed)
                if k in packed:  # what a head that keeps the weights packed dequantizes in each forward
                    assert torch.equal(packed[k].dequantize().cpu(), reference[k]), (method, k, device, seed)
    reference = quant.unpack(on_cpu, "cpu")
    assert quant.relative_error(state["a.weight"], reference["a.weight"]) < (0.01 if method == "int8" else 0.15)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_head_keeping_packed_weights_trains_on_cuda_as_the_dense_head(tiny_cfg, method):
    cfg = tiny_cfg(**{"lte.quant": method, "lte.merge_every": 4, "train.precision": "fp32",
                      "train.device": "cuda"})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data, CUDA)
    heads = {keep: Head(cfg.replace({"lte.keep_quantized": keep}), 0, data, CUDA) for keep in (False, True)}
    for round_idx in range(3):
        broadcast = master.broadcast(full=True)
        results = {keep: head.train_round(round_idx, broadcast) for keep, head in heads.items()}
        assert abs(results[True].loss - results[False].loss) < 1e-4 * max(1.0, abs(results[False].loss))
        dense, packed = (lora.lte_layers(heads[k].model) for k in (False, True))
        assert dense.keys() == packed.keys() and dense
        for name in dense:
            for factor in ("lora_A", "lora_B"):
                a, b = getattr(dense[name], factor).detach(), getattr(packed[name], factor).detach()
                assert a.device.type == b.device.type == "cuda"
                assert float((a - b).norm() / a.norm().clamp_min(1e-12)) < 1e-4, (round_idx, name, factor)
        accepted, rejected, _ = master.accept([results[False]])
        assert not rejected
        master.merge(accepted, round_idx)


def _name() -> str:
    return f"gpu-{uuid.uuid4().hex[:8]}"


def test_heads_share_the_gpu_with_the_coordinator_and_reach_the_digits_bar(ray_cluster, tmp_path):
    """The default digits config, four heads on one GPU and the coordinator on it too. Ray counts
    fractions per GPU, so with the coordinator's 0.2 the heads take 0.2 each (4 x 0.25 would leave
    it none)."""
    from lte_ray.resolve import build_config

    cfg = build_config({}, {"lte.heads": 4, "ray.gpus_per_head": 0.2, "ray.coordinator_gpus": 0.2,
                            "ray.cpus_per_head": 1, "train.device": "cuda"})
    name, seen = _name(), {}

    def on_round(rec):
        if "workers" not in seen:
            coordinator = ray.get_actor(name, namespace="lte-ray")
            seen["workers"] = ray.get(coordinator.workers.remote())
            seen["coordinator"] = ray.get(coordinator.status.remote())

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    workers = seen["workers"]
    assert len(workers) == 4
    gpu_ids = sorted({tuple(w["gpu_ids"]) for w in workers.values()})
    print(f"\nGPU run: {torch.cuda.get_device_name()}; coordinator on {seen['coordinator']['device']}; heads "
          f"{sorted({w['device'] for w in workers.values()})} GPU ids {gpu_ids};"
          f" accuracy {result.final.get('eval_accuracy')} after {result.rounds} rounds")
    assert {tuple(w["gpu_ids"]) for w in workers.values()} == {("0",)}
    assert all(w["device"] == "cuda:0" for w in workers.values())
    assert seen["coordinator"]["device"] == "cuda:0"
    assert result.final["eval_accuracy"] >= 0.90


def test_heads_without_a_gpu_share_stay_on_the_cpu_of_a_gpu_node(ray_cluster, ray_cfg, tmp_path):
    cfg = ray_cfg(**{"lte.heads": 2, "ray.gpus_per_head": 0, "train.rounds": 3, "train.device": "auto"})
    name, seen = _name(), {}

    def on_round(rec):
        seen.setdefault("workers", ray.get(ray.get_actor(name, namespace="lte-ray").workers.remote()))

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    assert result.rounds == 3 and len(seen["workers"]) == 2
    for info in seen["workers"].values():
        assert info["device"] == "cpu" and info["gpu_ids"] == [] and info["cuda_visible_devices"] == ""
