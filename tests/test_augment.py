"""`data.augment_shift`: training images move by a random offset of their own; the batches drawn,
their labels and the evaluation images do not change, and a run stays reproducible."""

import itertools

import pytest
import torch

from lte_ray.augment import random_shift
from lte_ray.batches import training_batches
from lte_ray.cli import main
from lte_ray.core.simulate import simulate
from lte_ray.data import load_data
from lte_ray.resolve import build_config


def test_each_image_moves_by_its_own_offset_within_the_bound():
    x = torch.randn(64, 3, 10, 10)
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    moves = set()
    for a, b in zip(x, y):  # find the offset that maps a's inside onto b's
        found = [(dy, dx) for dy, dx in itertools.product(range(-2, 3), repeat=2)
                 if torch.equal(b[:, 2:8, 2:8], a[:, 2 - dy:8 - dy, 2 - dx:8 - dx])]
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) > 10  # not one offset for the whole batch
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_edges_repeat_instead_of_moving_in_zeros():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) + 1
    moved = [random_shift(x, 1, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(m.min() >= 1 for m in moved)  # never a pixel from outside the image's values
    assert any(not torch.equal(m, x) for m in moved)


def test_shifted_batches_are_the_same_draws_reproducibly():
    cfg = build_config({}, {"data.augment_shift": 1})
    data = load_data(cfg.data, cfg.model)
    plain = training_batches(data, 16, seed=3)
    a, b = training_batches(data, 16, seed=3, shift=1), training_batches(data, 16, seed=3, shift=1)
    for _ in range(3):
        (xp, yp), (xa, ya), (xb, yb) = next(plain), next(a), next(b)
        assert torch.equal(ya, yp) and torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xp)


def test_a_run_with_shifts_trains_differently_and_reproducibly(tiny_cfg):
    cfg = tiny_cfg(**{"data.augment_shift": 1})
    a, b, plain = simulate(cfg), simulate(cfg), simulate(tiny_cfg())
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], plain.state[k]) for k in a.state)


@pytest.mark.parametrize("overrides,msg", [
    (["data.name=shakespeare", "model.name=gpt_nano", "data.augment_shift=2"], "data.augment_shift: moves images"),
    (["data.augment_shift=-1"], "data.augment_shift: must be >= 0")])
def test_bad_shift_is_a_one_line_error(overrides, msg, capsys):
    args = ["train", "--backend", "local"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
