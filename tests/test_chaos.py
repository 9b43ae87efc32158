"""`lte-ray bench chaos` (issue 12): its verdict on a report, its one-line errors, and its fault
schedule. The bench itself runs in tests/test_chaos_run.py."""

import pytest

from lte_ray.bench.chaos import markdown, problems
from lte_ray.bench.chaos_faults import chaos_schedule, ensure_auth_token
from lte_ray.cli import main

COUNTERS = {"heads_lost": 0, "heads_joined": 0, "late_results": 0, "heads_replaced_late": 0, "heads_rejected": 0,
            "heads_clipped": 0, "heads_reset": 0, "coordinator_restarts": 0, "start_failures": 0}


def _run(name, acc, wall, **kw):
    return {"scenario": name, "rounds": 60, "samples_seen": 76800, "wall_seconds": wall, "eval_accuracy": acc,
            "rounds_shown_twice": 0, "merged_rounds_lost": 0, "rounds_redone": 0, "tracking_down_s": 0.0, "mlflow_points": 60,
            "mlflow_steps_twice": 0, "counters": dict(COUNTERS), "faults": [], **kw}


def _report(*runs):
    return {"machine": {"cores": 2, "cpu": "x", "memory_gib": 24, "gpu": None, "torch": "t", "python": "3"},
            "rounds": 60, "nodes": 3, "runs": list(runs)}


def test_targets_met_and_missed():
    calm = _run("calm", 0.98, 60.0)
    assert problems(_report(calm, _run("straggler", 0.975, 75.0), _run("chaos", 0.971, 89.0))) == []
    bad = problems(_report(calm, _run("straggler", 0.98, 80.0), _run("chaos", 0.96, 95.0, merged_rounds_lost=1,
                                                                        mlflow_points=59)))
    assert "straggler: wall time 1.33x calm (target 1.3x)" in bad
    assert "chaos: accuracy 2.0 points below calm" in bad and "chaos: wall time 1.58x calm (target 1.5x)" in bad
    assert "chaos: 1 merged rounds lost, 0 shown twice" in bad and "chaos: MLflow holds 59 points for 60 rounds" in bad


def test_the_table_says_what_happened():
    chaos = _run("chaos", 0.97, 80.0, faults=["round 9: head 3 SIGKILLed"],
                 counters={**COUNTERS, "heads_lost": 3, "coordinator_restarts": 1})
    report = _report(_run("calm", 0.98, 60.0), chaos)
    report["problems"] = problems(report)
    text = markdown(report)
    row = "| chaos | 60 | 76,800 | 0 | 0 | 0.9700 | 80.0 | 1.33x | 60 (0 twice) | 3 heads lost, 1 coordinator restarts |"
    assert row in text
    assert "Faults injected (chaos): round 9: head 3 SIGKILLed." in text and "Targets: all met." in text


def test_every_fault_is_scheduled_inside_the_run():
    s = chaos_schedule(60)
    rounds = [*s.head_kills, s.node_kill, s.coordinator_kill, *s.tracking_down, s.slow_from, s.poison_from]
    assert all(2 <= r < 60 for r in rounds) and len(s.head_kills) == 4
    assert s.tracking_down[0] < s.tracking_down[1]


@pytest.mark.parametrize("args,msg", [(["--scenarios", "calm,storm"], "--scenarios: 'storm' is not one of"),
                                      (["--rounds", "5"], "--rounds: the faults need at least 10 rounds"),
                                      (["--nodes", "1"], "--nodes: a node is killed, so at least 2"),
                                      (["--set", "lte.heads=0"], "lte.heads")])
def test_bad_settings_are_one_line_errors(args, msg, capsys):
    assert main(["bench", "chaos", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]


def test_a_fresh_machine_gets_a_private_token_before_its_loopback_cluster_starts(tmp_path, monkeypatch):
    """`cluster_utils.Cluster` starts raylets without making a token (`ray.init` makes one): on a
    machine without ~/.ray/auth_token its GCS died at start and `bench chaos` with it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    ensure_auth_token()
    first = token.read_text()
    assert first.strip() and token.stat().st_mode & 0o777 == 0o600
    ensure_auth_token()  # an existing token is kept: the clusters already started use it
    assert token.read_text() == first
