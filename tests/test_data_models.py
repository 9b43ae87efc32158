import numpy as np
import pytest
import torch

from lte_ray.core.simulate import simulate
from lte_ray.core.task import resolve_device
from lte_ray.data import DataError, load_data
from lte_ray.datasets import BatchStream
from lte_ray.errors import UserError
from lte_ray.models import DataSpec, build_model
from lte_ray.resolve import build_config


def test_digits_split_is_fixed_and_disjoint():
    cfg = build_config()
    a, b = load_data(cfg.data, cfg.model), load_data(cfg.data, cfg.model)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359
    assert torch.equal(a.test.x, b.test.x)
    assert a.spec == DataSpec(task="classify", num_classes=10, in_chans=1, img_size=8)


def test_digits_read_without_importing_sklearn_are_load_digits():
    from sklearn.datasets import load_digits

    from lte_ray.data import digits_arrays

    images, labels = digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target) and labels.dtype == np.int64


def test_a_head_starts_ready_for_its_first_round():
    """Every head waits for a new head's first round: what that round would import (bitsandbytes
    for NF4, seconds) is imported while the head starts; what it never needs (scikit-learn for
    the digits) is not imported at all."""
    import subprocess
    import sys

    for quant, bitsandbytes in (("nf4", True), ("int8", False)):  # int8 is lte-ray's own: no bitsandbytes
        code = ("import sys; from lte_ray.resolve import build_config; from lte_ray.core.head import Head; "
                f"Head(build_config({{}}, {{'lte.quant': '{quant}'}}), 0, device='cpu'); "
                "print('sklearn' in sys.modules, 'bitsandbytes' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out == f"False {bitsandbytes}\n", quant


def test_npz_nhwc_uint8_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.integers(0, 255, (50, 12, 12, 3), dtype=np.uint8), y=rng.integers(0, 5, 50),
             x_test=rng.integers(0, 255, (10, 12, 12, 3), dtype=np.uint8), y_test=rng.integers(0, 5, 10))
    cfg = build_config({}, {"data.name": "npz", "data.path": str(path), "model.patch_size": 4})
    data = load_data(cfg.data, cfg.model)
    assert (len(data.train), len(data.test)) == (50, 10)
    assert data.spec.in_chans == 3 and data.spec.img_size == 12
    x, y = data.train.batch(torch.arange(4))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32


def test_npz_without_labels_is_a_clear_error(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 8, 8)))
    cfg = build_config({}, {"data.name": "npz", "data.path": str(path)})
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_data(cfg.data, cfg.model)


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = build_config({}, {"data.name": "folder", "data.path": str(tmp_path), "data.image_size": 16,
                            "data.test_fraction": 0.2})
    data = load_data(cfg.data, cfg.model)
    assert (len(data.train), len(data.test)) == (8, 2) and data.spec.num_classes == 2
    x, y = data.train.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["vit_tiny", "mixer_s"])
def test_image_models_build_for_the_data(name):
    cfg = build_config({}, {"model.name": name, "model.depth": 2, "model.width": 32, "model.attn_heads": 2,
                            "model.patch_size": 4})
    model = build_model(cfg.model, DataSpec(task="classify", num_classes=7, in_chans=3, img_size=16))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_gpt_is_causal():
    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "text", "data.path": __file__,
                            "model.width": 32, "model.depth": 2, "model.context": 16})
    model = build_model(cfg.model, DataSpec(task="lm", vocab_size=256)).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 256  # changing the last token must not change earlier outputs
    assert torch.allclose(model(x)[0, :-1], model(y)[0, :-1])


def test_batch_streams_are_seeded_per_head():
    a, b, c = BatchStream(100, 8, seed=1), BatchStream(100, 8, seed=1), BatchStream(100, 8, seed=2)
    assert torch.equal(a.next(), b.next()) and not torch.equal(a.next(), c.next())
    stream = BatchStream(96, 8, seed=3)
    epoch = torch.cat([stream.next() for _ in range(12)])
    assert sorted(epoch.tolist()) == list(range(96))  # an epoch visits every example once


def test_same_config_and_seed_give_the_same_weights(tiny_cfg):
    cfg = tiny_cfg(**{"lte.quant": "nf4"})
    a, b = simulate(cfg), simulate(cfg)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    c = simulate(tiny_cfg(**{"train.seed": 1}))
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_device_selection():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.device: cuda"):
            resolve_device("cuda")
