import os

import pytest

# Local Ray clusters of the tests (and the processes they start) bind to 127.0.0.1 only; Ray
# reads this when it is imported, so it is set before any test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lte_ray.resolve import build_config


@pytest.fixture
def tiny_cfg():
    """A small, fast digits config (override further per test)."""

    def make(**overrides):
        base = {"model.depth": 2, "model.width": 32, "model.attn_heads": 2, "lte.heads": 2, "lte.rank": 4,
                "lte.merge_every": 2, "train.rounds": 2, "train.batch_size": 16, "train.device": "cpu"}
        base.update(overrides)
        return build_config({}, base)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: 8 logical CPUs (actors take fractions of them) and
    one advertised GPU (there is none; fractional-GPU scheduling is what gets tested), bound to
    127.0.0.1. Yields the GCS address, for second processes to connect to."""
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, namespace="lte-ray",
             log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def ray_cfg(tiny_cfg):
    """tiny_cfg with actors sized for 2 cores; the first round waits for every head to start
    (on a loaded machine a head can take longer than the default grace, and tests that compare
    exact results need all heads in every round)."""

    def make(**overrides):
        return tiny_cfg(**{"ray.cpus_per_head": 0.5, "ray.start_grace_s": 600, **overrides})

    return make


@pytest.fixture
def mlflow_http_env():
    """The process-wide MLflow HTTP settings a Tracker sets (`tracking.HTTP_ENV`), put back afterwards."""
    from lte_ray.tracking import HTTP_ENV

    saved = {k: os.environ.get(k) for k in HTTP_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
