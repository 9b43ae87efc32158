"""Load a config and check it against the world, once, at load time.

`lte_ray.config` knows a config's shape and validates it without looking anywhere. What needs
more is here, in `resolve`: the method and the model exist in their registries, the method's
optional package is installed, the model fits the data's task, the data path exists (or the
corpus is installed). `load_config` and `build_config` are how a run gets its config; the
components that run it (heads, coordinator, Tune trials) receive the resolved object and do not
look again.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lte_ray.config import Config, ConfigError, load_yaml, validate
from lte_ray.core.methods import get_method
from lte_ray.data import check_data, data_task
from lte_ray.models import model_family


def resolve(cfg: Config) -> Config:
    """`cfg`, checked against the registries, the installed packages and the file system; the
    first problem found is a one-line `ConfigError` that names the field."""
    method = get_method(cfg.method)
    if method.needs and importlib.util.find_spec(method.needs.module) is None:
        raise ConfigError(f"method: {method.name} needs the {method.needs.pip} package "
                          f"(pip install {method.needs.pip})")
    family = model_family(cfg.model.name)
    task = data_task(cfg.data)
    if family.task != task:
        need = ("text data (data.name=text, shakespeare, kjv or tokens)" if family.task == "lm"
                else f"image data, not data.name={cfg.data.name}")
        raise ConfigError(f"model.name: {cfg.model.name} needs {need}")
    m = cfg.model
    if family.attention and m.width and m.attn_heads and m.width % m.attn_heads:
        raise ConfigError(f"model.width: {m.width} is not divisible by model.attn_heads={m.attn_heads}")
    if cfg.data.augment_shift and task != "classify":
        raise ConfigError(f"data.augment_shift: moves images; data.name={cfg.data.name} is text")
    check_data(cfg.data)
    if method.on_ray:
        method.lte_config(cfg)  # the config its heads run is valid too (e.g. lora turns quantization off)
    return cfg


def build_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """`base` (e.g. from YAML) with dotted `overrides` on top: validated, then resolved."""
    return resolve(validate(base, overrides))


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The config in YAML file `path` (None: the defaults) with dotted `overrides` on top."""
    return build_config(load_yaml(path) if path else {}, overrides)
