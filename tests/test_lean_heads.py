"""Lean heads: the folded snapshot, a snapshot path that saves nothing for backward, activation
checkpointing, precision, and DataLoader batches equal to the in-process ones."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lte_ray.batches import training_batches
from lte_ray.core import lora
from lte_ray.core.head import Head
from lte_ray.core.master import MasterWeights
from lte_ray.core.precision import resolve_precision
from lte_ray.data import load_data
from lte_ray.datasets import batch_stream
from lte_ray.models import build_model, set_activation_checkpointing
from lte_ray.resolve import build_config


def _trained_layer(seed: int = 0) -> lora.LTELinear:
    """An LTE layer whose factors moved away from their snapshot (as after some local steps)."""
    torch.manual_seed(seed)
    layer = lora.LTELinear(nn.Linear(24, 16), rank=4, alpha=32.0)
    layer.init_factors(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)
        layer.snapshot()
        layer.lora_A.add_(0.01 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.01 * torch.randn_like(layer.lora_B))
    return layer


def _forward_and_grads(layer: lora.LTELinear, x: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def test_the_folded_forward_equals_the_unfolded_one():
    unfolded = _trained_layer()
    folded = copy.deepcopy(unfolded)
    folded.fold()
    assert folded.folded and not unfolded.folded
    assert not torch.equal(folded.weight, unfolded.weight)  # the fold really changed W
    x = torch.randn(8, 24)
    for got, want in zip(_forward_and_grads(folded, x), _forward_and_grads(unfolded, x)):
        assert (got - want).abs().max().item() < 1e-5
    # the exported delta is the same: it is made of the factors, not of W
    for a, b in zip(folded.delta_factors(), unfolded.delta_factors()):
        assert torch.equal(a, b)


def test_a_folded_layer_refuses_a_new_snapshot_until_its_weight_is_loaded_again():
    layer = _trained_layer()
    layer.fold()
    with pytest.raises(RuntimeError, match="folded"):
        layer.snapshot()
    model = nn.Sequential(layer)
    lora.load_shared_state(model, {"0.weight": torch.zeros(16, 24), "0.bias": torch.zeros(16)})
    assert not layer.folded
    layer.snapshot()  # allowed again


def _saved_bytes(module: nn.Module, x: torch.Tensor, exclude: set[int]) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x).sum().backward()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for p, n in storages.items() if p not in exclude)


@pytest.mark.parametrize("packed", [False, True])
def test_the_snapshot_path_saves_nothing_for_backward(packed):
    """Activations of an LTE layer: x (for A's gradient) and A x (for B's), as in plain LoRA;
    the snapshot path (unfolded with a packed W, folded away with a dense one) adds nothing."""
    from lte_ray.core import quant

    layer = _trained_layer()
    if packed:
        broadcast = quant.pack({"w": layer.weight.detach()}, ["w"], "nf4")
        layer.set_packed(quant.packed_weights(broadcast)["w"])
    else:
        layer.fold()
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    x = torch.randn(32, 24)
    assert _saved_bytes(layer, x, own) == x.nbytes + 32 * layer.rank * 4


@pytest.mark.parametrize("name,extra", [("vit_tiny", {}), ("gpt_nano", {"data.name": "shakespeare"})])
def test_activation_checkpointing_keeps_gradients_and_saves_memory(tiny_cfg, name, extra):
    cfg = tiny_cfg(**{"model.name": name, "model.context": 16, **extra})
    data = load_data(cfg.data, cfg.model)
    x, y = data.train.batch(batch_stream(data, 8, 0).next())
    grads, saved = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, data.spec)
        lora.to_lte(model, 4, 32.0, ["*"])
        lora.init_factors(model, torch.Generator().manual_seed(1))
        set_activation_checkpointing(model, on)
        stored = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
            logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        saved.append(len(stored))
    assert grads[0].keys() == grads[1].keys() and any(lora.is_lora_key(n) for n in grads[0])
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max().item() < 1e-5, n
    assert saved[1] < saved[0] / 2  # only the blocks' inputs and what lies outside the blocks


def test_precision_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "tf32", "bf16")] == ["fp32", "fp32", "fp32", "bf16"]
    assert [resolve_precision(p, cuda) for p in ("auto", "fp32", "tf32", "bf16")] == ["tf32", "fp32", "tf32", "bf16"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_bf16_head_trains_with_fp32_factors_and_optimizer_state(tiny_cfg, keep):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_cfg(**{"train.precision": precision, "lte.keep_quantized": keep, "lte.merge_every": 4})
        data = load_data(cfg.data, cfg.model)
        head = Head(cfg, 0, data, "cpu")
        result = head.train_round(0, MasterWeights(cfg, data).broadcast(full=True))
        losses[precision] = result.loss
        up = result.upload  # a first upload: every factor, exactly
        assert all(t.data.dtype == torch.float32 for t in [*up.b.values(), *up.a.values()])
        states = [t for st in head.opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
        assert states and all(t.dtype == torch.float32 for t in states)
    assert head.precision == "bf16"
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]


@pytest.fixture
def digit_folder(tmp_path):
    """Real digits (scikit-learn's 8x8 images) written as a class-per-folder PNG tree."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images[:120], d.target[:120])):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray((img * 16).clip(0, 255).astype(np.uint8)).save(tmp_path / str(label) / f"{i}.png")
    return tmp_path


def test_dataloader_workers_give_the_in_process_batches(digit_folder):
    cfg = build_config({}, {"data.name": "folder", "data.path": str(digit_folder), "data.image_size": 16})
    data = load_data(cfg.data, cfg.model)
    stream = batch_stream(data, 16, seed=7)
    expected = [data.train.batch(stream.next()) for _ in range(8)]  # more than one epoch of 96 images
    for workers in (0, 2):
        batches = training_batches(data, 16, seed=7, workers=workers)
        for want_x, want_y in expected:
            x, y = next(batches)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
    other = next(training_batches(data, 16, seed=8, workers=2))
    assert not torch.equal(other[0], expected[0][0])


def test_in_memory_batches_follow_the_stream(tiny_cfg):
    cfg = tiny_cfg()
    data = load_data(cfg.data, cfg.model)
    stream, batches = batch_stream(data, 16, 3), training_batches(data, 16, 3)
    for _ in range(3):
        x, y = next(batches)
        want_x, want_y = data.train.batch(stream.next())
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_heads_with_loader_workers_on_ray_equal_simulate(ray_cluster, ray_cfg, digit_folder, tmp_path):
    """On Ray a head with 2 CPUs decodes its image-folder batches in 1 DataLoader worker process;
    in-process heads decode them themselves: the runs end at the same weights."""
    import uuid

    from lte_ray.core.simulate import simulate
    from lte_ray.runtime.launch import train

    cfg = ray_cfg(**{"data.name": "folder", "data.path": str(digit_folder), "data.image_size": 8,
                     "ray.cpus_per_head": 2, "lte.quant": "none", "train.rounds": 2})
    on_ray = train(cfg, run_name=f"test-{uuid.uuid4().hex[:8]}", output_dir=str(tmp_path))
    local = simulate(cfg)
    diff = max((on_ray.state[k] - local.state[k]).abs().max().item() for k in local.state)
    assert diff < 1e-5, f"max abs difference {diff:.2e}"
