"""Tracking is best-effort: an MLflow server that is down, slow or back after an outage never
blocks or ends training, and every round reaches MLflow once, in order, when it answers. No Ray."""

import json
import logging
import os
import socket
import time

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lte_ray import tracking_backlog, tracking_writer
from lte_ray.checkpoint import save_checkpoint
from lte_ray.core.protocol import RoundRecord
from lte_ray.errors import UserError
from lte_ray.outputs import RunOutput
from lte_ray.run import Run
from lte_ray.tracking import HTTP_ENV, Tracker, saved_run_id
from lte_ray.tracking_backlog import metrics_from_json

ROUNDS = 20
STARTED = time.time()


def record(i: int) -> RoundRecord:
    """Round i, made when it ends (`elapsed` runs with the clock, as in a run)."""
    evals = {"eval_accuracy": 0.5 + i / 100, "eval_loss": 1.0 / i} if i % 5 == 0 else {}
    return RoundRecord(round=i, rounds=ROUNDS, samples_seen=64 * i, train_loss=2.0 / i,
                       head_losses={0: 2.1 / i, 1: 1.9 / i}, active_heads=2, elapsed=time.time() - STARTED,
                       evals=evals, bytes_up=1000 * i, round_seconds=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch, mlflow_http_env):
    """Backoff in milliseconds; the process-wide MLflow HTTP settings the tracker sets are put back."""
    monkeypatch.setattr(tracking_writer, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(tracking_writer, "RETRY_MAX_S", 0.05)


class Outage:
    """MlflowClient methods that fail as MLflow's REST client does when nothing answers, while `down`."""

    def __init__(self, monkeypatch, methods=("log_batch",), down=True, first_calls=None):
        self.down, self.calls, self.first_calls = down, 0, first_calls
        for name in methods:
            real = getattr(MlflowClient, name)
            monkeypatch.setattr(MlflowClient, name, self._wrap(real))

    def _wrap(self, real):
        def call(client, *args, **kwargs):
            self.calls += 1
            failing = self.down if self.first_calls is None else self.calls <= self.first_calls
            if failing:
                raise MlflowException("API request to http://user:hunter2@mlflow.test/api/2.0/mlflow/runs/log-batch "
                                      "failed with exception ConnectionError")
            return real(client, *args, **kwargs)
        return call


def sqlite_cfg(tiny_cfg, tmp_path):
    return tiny_cfg(**{"tracking.mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output": str(tmp_path / "run")})


def assert_every_round_once_in_order(tracker: Tracker) -> None:
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lte.rank"] == "4"
    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, ROUNDS + 1))
    assert [m.value for m in history] == [record(i).train_loss for i in range(1, ROUNDS + 1)]
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps)  # the order they happened in
    assert [m.step for m in client.get_metric_history(tracker.run_id, "eval_accuracy")] == [5, 10, 15, 20]
    assert len(client.get_metric_history(tracker.run_id, "train_loss_head_1")) == ROUNDS


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lte_ray.tracking"]


@pytest.mark.timeout(60)
def test_unreachable_server_never_blocks_or_ends_training(tiny_cfg, tmp_path, caplog):
    uri = f"http://user:hunter2@127.0.0.1:{free_port()}/?token=s3cret"
    cfg = tiny_cfg(**{"tracking.mlflow_uri": uri})
    start = time.monotonic()
    tracker = Tracker(cfg, tmp_path, "down", flush_timeout_s=1.0)
    assert time.monotonic() - start < 10 and tracker.run_id is None  # training starts; the run comes later
    start = time.monotonic()
    for i in range(1, ROUNDS + 1):
        tracker.log_round(record(i))
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    tracker.finish(tmp_path, None, status="FINISHED")  # never raises
    assert time.monotonic() - start < 5
    messages = warnings_of(caplog)
    assert sum("does not answer" in m for m in messages) == 1  # one warning, not one per retry
    assert any("gave up" in m and "20 rounds" in m for m in messages)
    assert "hunter2" not in caplog.text and "s3cret" not in caplog.text


def test_server_down_then_back_gets_every_round_once_in_order(tiny_cfg, tmp_path, monkeypatch, caplog):
    tracker = Tracker(sqlite_cfg(tiny_cfg, tmp_path), tmp_path, "flaky")
    outage = Outage(monkeypatch, first_calls=8)  # MLflow's log_batch fails 8 times, then works
    for i in range(1, ROUNDS + 1):
        tracker.log_round(record(i))  # returns although log_batch raises
    tracker.finish(tmp_path, None, status="FINISHED")
    assert outage.calls > 8
    assert_every_round_once_in_order(tracker)
    messages = warnings_of(caplog)
    assert sum("does not answer" in m for m in messages) == 1 and sum("answers again" in m for m in messages) == 1
    assert "hunter2" not in caplog.text


def test_server_down_at_start_creates_the_run_later_and_backfills(tiny_cfg, tmp_path, monkeypatch):
    outage = Outage(monkeypatch, methods=("get_experiment_by_name", "create_experiment", "create_run", "log_batch"))
    tracker = Tracker(sqlite_cfg(tiny_cfg, tmp_path), tmp_path, "late")
    assert tracker.run_id is None
    for i in range(1, ROUNDS + 1):
        tracker.log_round(record(i))
    outage.down = False
    tracker.finish(tmp_path, None, status="FINISHED")
    assert tracker.run_id is not None
    assert_every_round_once_in_order(tracker)
    assert saved_run_id(tmp_path, tracker.uri) == tracker.run_id  # for --resume: no checkpoint before named it
    assert saved_run_id(tmp_path, "http://elsewhere:5000") is None  # a run in another store


def test_a_resume_continues_the_mlflow_run_its_checkpoint_could_not_name(tiny_cfg, tmp_path):
    """MLflow was down when the run started, so its checkpoints say mlflow_run_id null (written here by
    hand); the tracker wrote the id into the folder when MLflow answered, and `--resume` continues that run."""
    cfg = sqlite_cfg(tiny_cfg, tmp_path)
    first = Tracker(cfg, cfg.output, "late")
    first.log_round(record(1))
    first.finish(cfg.output, None, status="KILLED")
    save_checkpoint(cfg.output, {"w": torch.zeros(2)}, {"round": 1, "next_head_id": 2, "counters": {},
                                                        "samples_seen": 64, "wall_seconds": 1.0,
                                                        "mlflow_run_id": None, "config": {}})
    resumed = Run(cfg, resume=True)
    assert resumed.tracker.run_id == first.run_id
    resumed.abort("KILLED")
    client = MlflowClient(tracking_uri=first.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and len(client.search_runs([run.info.experiment_id])) == 1  # no second run
    # A new run in the folder (not a resume) replaces the old id: a later --resume cannot pick the old one up.
    Tracker(cfg, cfg.output, "again").finish(cfg.output, None, status="KILLED")
    assert saved_run_id(cfg.output, first.uri) not in (None, first.run_id)


def test_a_long_outage_keeps_memory_bounded_and_backfills_from_metrics_jsonl(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_backlog, "MAX_PENDING_ROUNDS", 5)
    cfg = sqlite_cfg(tiny_cfg, tmp_path)
    out = RunOutput(cfg)  # metrics.jsonl, as Run.record writes it before the tracker sees the round
    tracker = Tracker(cfg, out.dir, "long")
    outage = Outage(monkeypatch)
    for i in range(1, ROUNDS + 1):
        rec = record(i)
        out.record(rec)
        tracker.log_round(rec)
        time.sleep(0.005)  # rounds some ms apart, as in a run (the points read back are dated by `elapsed`)
        assert len(tracker._writer.backlog.rounds) <= 5
    assert tracker._writer.backlog.spill is not None
    outage.down = False
    tracker.finish(out.dir, None, status="FINISHED")
    assert_every_round_once_in_order(tracker)


def test_a_call_mlflow_refuses_is_dropped_not_retried(tiny_cfg, tmp_path, monkeypatch, caplog):
    real = MlflowClient.log_batch

    def refuse_params(client, run_id, metrics=(), params=(), tags=(), **kwargs):
        if params:
            raise MlflowException("param changed", error_code=INVALID_PARAMETER_VALUE)
        return real(client, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", refuse_params)
    tracker = Tracker(sqlite_cfg(tiny_cfg, tmp_path), tmp_path, "refused", flush_timeout_s=10)
    for i in range(1, ROUNDS + 1):
        tracker.log_round(record(i))
    start = time.monotonic()
    tracker.finish(tmp_path, None, status="FINISHED")
    assert time.monotonic() - start < 5
    client = MlflowClient(tracking_uri=tracker.uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")] == list(range(1, ROUNDS + 1))
    assert any("refused a call" in m for m in warnings_of(caplog))


@pytest.mark.parametrize("uri", ["bogus://nowhere", "http://", "https://user:pw@/x"])
def test_a_uri_mlflow_cannot_use_is_a_one_line_error(tiny_cfg, tmp_path, uri):
    with pytest.raises(UserError) as err:
        Tracker(tiny_cfg(**{"tracking.mlflow_uri": uri}), tmp_path, "bad")
    assert "tracking.mlflow_uri" in str(err.value) and "\n" not in str(err.value) and "pw" not in str(err.value)


def test_metrics_read_back_from_metrics_jsonl_are_the_records_metrics():
    for rec in (record(4), record(5)):
        line = json.loads(json.dumps(rec.to_json(), default=float))
        assert metrics_from_json(line) == rec.metrics()


def test_the_writer_makes_http_attempts_quick(tiny_cfg, tmp_path):
    for k in HTTP_ENV:
        os.environ.pop(k, None)
    Tracker(tiny_cfg(), tmp_path, "env").finish(tmp_path, None)
    import mlflow.environment_variables as env

    assert env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0 and env.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 10


def test_tracker_logs_the_caller_nothing_but_warnings(tiny_cfg, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    tracker = Tracker(tiny_cfg(), tmp_path, "quiet")
    tracker.log_round(record(1))
    tracker.finish(tmp_path, None)
    assert warnings_of(caplog) == []


def test_the_backlog_spills_the_oldest_rounds_and_reads_them_back_once_in_order(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    recs = [record(i) for i in range(1, 8)]
    jsonl.write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs + [recs[2]]))  # round 3 twice
    backlog = tracking_backlog.Backlog(jsonl, limit=3)
    for r in recs[:3]:
        backlog.add(r.round, 0, r.metrics(), r.elapsed)
    in_flight = backlog.take()
    for r in recs[3:]:
        backlog.add(r.round, 0, r.metrics(), r.elapsed)  # 4 spills: memory holds 5..7
    assert backlog.spill == (4, 4) and len(backlog) == 4
    backlog.put_back(in_flight)  # not written: 1..3 go back first, into the spill before 4
    assert backlog.spill == (1, 4) and backlog.take() is None and len(backlog) == 7
    batch, pos = backlog.read_spill(backlog.spill, backlog.spill_pos)
    assert [step for step, _, _ in batch] == [1, 2, 3, 4] and batch[0][2] == recs[0].metrics()
    backlog.spill_written(batch, pos)
    assert backlog.spill is None and [step for step, _, _ in backlog.take()] == [5, 6, 7]
