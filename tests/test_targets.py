"""The default LoRA targets: every nn.Linear but the output layer, which trains as a replica."""

import pytest
from torch import nn

from lte_ray.core import lora
from lte_ray.core.head import Head
from lte_ray.core.master import MasterWeights
from lte_ray.data import load_data
from lte_ray.errors import UserError
from lte_ray.models import build_model
from lte_ray.resolve import build_config


@pytest.mark.parametrize("name,data", [("vit_tiny", "digits"), ("mixer_s", "digits"), ("gpt_nano", "shakespeare")])
def test_the_default_rule_leaves_each_models_output_layer_to_the_replicas(name, data):
    cfg = build_config(None, {"model.name": name, "model.width": 32, "model.depth": 1, "data.name": data})
    model = build_model(cfg.model, load_data(cfg.data, cfg.model).spec)
    every = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert lora.output_layer_name(model) == "head" and every[-1] == "head"
    assert lora.target_names(model, cfg.lte.targets, cfg.lte.output_as_replica) == every[:-1]
    assert lora.target_names(model, ["*"]) == every  # explicit patterns mean what they say
    assert lora.target_names(model, None, output_as_replica=False) == every  # frozen replicas could not train it


def test_a_head_trains_the_output_layer_full_rank_and_the_coordinator_averages_it():
    cfg = build_config(None, {"model.width": 32, "model.depth": 1, "lte.heads": 2, "train.rounds": 1})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    assert "head.weight" not in master.quant_keys and "blocks.0.mlp.fc1.weight" in master.quant_keys
    head = Head(cfg, 0, data=data)
    assert not isinstance(head.model.head, lora.LTELinear) and head.model.head.weight.requires_grad
    assert isinstance(head.model.blocks[0].mlp.fc1, lora.LTELinear)
    replicas = head.export_replicas()
    assert "head.weight" in replicas and "blocks.0.mlp.fc1.weight" not in replicas
    frozen = build_config(None, {"model.width": 32, "model.depth": 1, "lte.replicas": "frozen"})
    assert "head.weight" in MasterWeights(frozen, data).quant_keys


def test_a_model_without_get_classifier_uses_its_last_linear_and_one_linear_is_an_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert lora.output_layer_name(model) == "2" and lora.target_names(model, None) == ["0"]
    with pytest.raises(UserError, match="no nn.Linear layer but its output layer"):
        lora.to_lte(nn.Sequential(nn.Linear(4, 2)), 2, 16.0, None)
    assert lora.to_lte(nn.Sequential(nn.Linear(4, 2)), 2, 16.0, None, output_as_replica=False) == ["0"]
