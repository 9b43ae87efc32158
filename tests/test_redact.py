"""Credentials in an MLflow URI or Ray address are never printed or stored: not on the console,
in config.yaml, summary.json, metrics.jsonl or the MLflow params; `--resume` asks for them again."""

import json
import socket

import pytest
from mlflow import MlflowClient

from lte_ray import cli, tracking
from lte_ray.errors import UserError
from lte_ray.outputs import RunOutput
from lte_ray.redact import is_redacted, masked_fields, redact, redacted_config, scrub
from lte_ray.resolve import build_config

TINY = ["--set", "model.depth=2", "--set", "model.width=32", "--set", "model.attn_heads=2", "--set", "lte.heads=2",
        "--set", "lte.rank=4", "--set", "lte.merge_every=2", "--set", "train.batch_size=16"]
SECRETS = ("hunter2", "s3cret", "pa55word")
RAY_ADDRESS = "ray://admin:pa55word@127.0.0.1:10001"


@pytest.mark.parametrize("uri, shown", [
    ("https://user:hunter2@mlflow.example.com/", "https://***@mlflow.example.com/"),
    ("https://hunter2@mlflow.example.com:5000/x", "https://***@mlflow.example.com:5000/x"),
    ("http://host/?token=abc&experiment=1", "http://host/?token=***&experiment=1"),
    ("http://h/p?api_key=1&X-Amz-Signature=2&password=3&a=b#f", "http://h/p?api_key=***&X-Amz-Signature=***&password=***&a=b#f"),
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    (RAY_ADDRESS, "ray://***@127.0.0.1:10001"),
    ("admin:pa55word@10.0.0.1:6379", "***@10.0.0.1:6379"),
    ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("127.0.0.1:6379", "127.0.0.1:6379"),
    ("auto", "auto"),
    ("", ""),
])
def test_redact(uri, shown):
    assert redact(uri) == shown
    assert redact(shown) == shown  # idempotent
    assert is_redacted(shown) == (shown != uri) and not is_redacted(uri)


def test_scrub_masks_urls_and_the_uris_own_credentials_anywhere_in_a_message():
    uri = "http://user:hunter2@mlflow.test/?token=s3cret"
    text = ("API request to http://user:hunter2@mlflow.test/?token=s3cret/api/2.0/x failed: "
            "Max retries exceeded with url: /?token=s3cret/api/2.0/x")
    assert not any(s in scrub(text, uri) for s in SECRETS)
    assert "http://***@mlflow.test/?token=***" in scrub(text)


def test_redacted_config_masks_the_uri_fields_and_leaves_its_input_alone(tiny_cfg):
    cfg = tiny_cfg(**{"tracking.mlflow_uri": "https://u:hunter2@h/", "ray.address": RAY_ADDRESS}).to_dict()
    shown = redacted_config(cfg)
    assert shown["tracking"]["mlflow_uri"] == "https://***@h/" and shown["ray"]["address"] == "ray://***@127.0.0.1:10001"
    assert cfg["tracking"]["mlflow_uri"] == "https://u:hunter2@h/"  # a copy
    assert {k: v for k, v in shown.items() if k not in ("tracking", "ray")} == \
        {k: v for k, v in cfg.items() if k not in ("tracking", "ray")}
    assert masked_fields(shown) == ["tracking.mlflow_uri", "ray.address"] and masked_fields(cfg) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored_texts(out) -> list[str]:
    return [p.read_text() for p in out.iterdir() if p.suffix in (".json", ".yaml", ".jsonl")]


@pytest.mark.timeout(300)
def test_a_train_run_never_prints_or_stores_credentials(tmp_path, capsys, caplog, monkeypatch, mlflow_http_env):
    monkeypatch.setattr(tracking, "FLUSH_TIMEOUT_S", 0.5)  # nothing answers there: do not wait long at the end
    uri = f"http://user:hunter2@127.0.0.1:{free_port()}/?token=s3cret"
    out = tmp_path / "run"
    assert cli.main(["train", "--backend", "local", "--rounds", "1", "--output", str(out), "--mlflow-uri", uri,
                     "--address", RAY_ADDRESS, *TINY]) == 0
    printed = capsys.readouterr()
    assert f"MLflow {redact(uri)}" in printed.err
    for text in [printed.out, printed.err, caplog.text, *stored_texts(out)]:
        assert not any(s in text for s in SECRETS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow_uri"] == redact(uri) == summary["config"]["tracking"]["mlflow_uri"]
    assert summary["config"]["ray"]["address"] == redact(RAY_ADDRESS)


@pytest.mark.timeout(300)
def test_the_mlflow_params_hold_no_credentials(tmp_path, mlflow_http_env):
    out = tmp_path / "run"
    assert cli.main(["train", "--backend", "local", "--quiet", "--rounds", "1", "--output", str(out),
                     "--address", RAY_ADDRESS, *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])  # the default store, in the output folder
    params = client.get_run(summary["mlflow_run_id"]).data.params
    assert params["ray.address"] == redact(RAY_ADDRESS)
    assert not any(s in v for v in params.values() for s in SECRETS)
    assert not any(s in text for text in stored_texts(out) for s in SECRETS)


def test_resume_or_rerun_asks_again_for_credentials_it_did_not_store(tmp_path, monkeypatch):
    uri = "https://user:hunter2@mlflow.example.com/"
    run = tmp_path / "run"
    RunOutput(build_config({}, {"tracking.mlflow_uri": uri, "ray.address": RAY_ADDRESS, "output": str(run)})).close()
    assert not any(s in (run / "config.yaml").read_text() for s in SECRETS)
    monkeypatch.setattr(cli, "_resumable", lambda d: str(run / "config.yaml"))  # no checkpoint needed for this

    def config(*flags):
        return cli.config_from_args(cli.build_parser().parse_args(["train", "--resume", str(run), *flags]))

    with pytest.raises(UserError, match="--mlflow-uri") as err:
        config()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--address"):
        config("--mlflow-uri", uri)
    cfg = config("--mlflow-uri", uri, "--address", RAY_ADDRESS)
    assert (cfg.tracking.mlflow_uri, cfg.ray.address) == (uri, RAY_ADDRESS)  # the real ones again
    assert cli.main(["train", "--resume", str(run)]) == 2  # one line, exit 2
    assert cli.main(["train", "--backend", "local", "--config", str(run / "config.yaml")]) == 2  # a rerun alike


def test_a_ray_address_with_credentials_is_not_printed_when_it_cannot_be_reached(tiny_cfg, monkeypatch):
    import ray

    from lte_ray.errors import UserError
    from lte_ray.runtime import launch

    def refuse(address, **_):
        raise ConnectionError(f"could not reach {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError) as e:
        launch.connect(tiny_cfg(), "ray://alice:s3cret@10.0.0.1:10001")
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value) and "10.0.0.1:10001" in str(e.value)
