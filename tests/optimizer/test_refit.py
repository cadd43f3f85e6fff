"""The optimizer job on a real store: snapshots, serving, pauses, stop rule, the lock."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from chatbot.cli import app
from optimizer.assignment import Assigner
from optimizer.config import Config, GuardrailConfig
from optimizer.locks import job_lock
from optimizer.refit import run_optimizer
from optimizer.store import Store, schema
from tests.support.optimizer_events import EXPERIMENT, T0, add_sessions, make_config, register

NOW = T0 + timedelta(days=10)
LOCK = f"optimizer:{EXPERIMENT}"
DOWN = GuardrailConfig(metric="thumbs_down_rate", max_delta=0.05)


def config(**kw: object) -> Config:
    params: dict[str, object] = {"burn_in": 50, "challenger_min_sessions": 0, "samples": 2000}
    params.update(kw)
    arms = params.pop("arms", ("a", "b", "c"))
    guardrails = params.pop("guardrails", ())
    return make_config(arms, guardrails=guardrails, **params)  # type: ignore[arg-type]


def arm_events(store: Store, kind: str) -> list[tuple[str, dict[str, object]]]:
    ev = schema.arm_events
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ev.c.arm_id, ev.c.evidence).where(ev.c.kind == kind).order_by(ev.c.id)
        ).all()
    return [(r.arm_id, r.evidence) for r in rows]


def seed_clear_winner(store: Store, cfg: Config) -> None:
    register(store, cfg)
    add_sessions(store, "a", 300, conversions=90)
    add_sessions(store, "b", 300, conversions=15)
    add_sessions(store, "c", 300, conversions=12)


def test_snapshot_is_written_and_serving_follows_it(store: Store) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.snapshot_version == 1 and run.sessions == 900
    alloc = run.allocation["segments"]["*"]
    assert sum(alloc.values()) == pytest.approx(1) and alloc["a"] > 0.9
    snap = store.latest_snapshot(EXPERIMENT)
    assert snap.version == 1 and snap.policy == "thompson" and snap.allocation == run.allocation
    arm = snap.summary["arms"]["a"]
    for key in (
        "status",
        "sessions",
        "complete_sessions",
        "kpi_mean",
        "kpi_ci",
        "prob_best",
        "expected_loss",
        "conversion_rate",
        "conversion_ci",
        "thumbs_up_rate",
        "thumbs_down_rate",
        "median_support_minutes",
        "guardrails",
    ):
        assert key in arm
    assert arm["status"] == "champion" and arm["conversion_rate"] == pytest.approx(0.3)
    assert {"srm", "stop", "segments", "policy", "now", "model"} <= set(snap.summary)
    assert snap.summary["model"] == "beta" and snap.summary["srm"]["warning"] is False

    assigner = Assigner(store, EXPERIMENT, salt=EXPERIMENT, snapshot_ttl_s=0)
    served = [assigner.assign(f"new-{i}", f"new-user-{i}", at=NOW) for i in range(40)]
    assert all(r.snapshot_version == 1 for r in served)
    assert all(r.propensity == pytest.approx(alloc[r.arm_id]) for r in served)
    assert sum(assigner.allocation().for_segment("*").values()) == pytest.approx(1)
    assert sum(r.arm_id == "a" for r in served) >= 30

    again = run_optimizer(store, cfg, now=NOW + timedelta(hours=1), random_state=0)
    assert again is not None and again.snapshot_version == 2
    assert assigner.assign("newest", "newest-user", at=NOW).snapshot_version == 2


def test_guardrail_pause_is_recorded_once_with_evidence(store: Store) -> None:
    cfg = config(guardrails=(DOWN,))
    register(store, cfg)
    add_sessions(store, "a", 200, conversions=20, turns=2, ups=360, downs=40)
    add_sessions(store, "b", 200, conversions=40, turns=2, ups=240, downs=160)  # wins, but hurts
    add_sessions(store, "c", 200, conversions=20, turns=2, ups=350, downs=50)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.paused == ("b",)
    assert "b" not in run.allocation["segments"]["*"]
    assert store.arm_statuses(EXPERIMENT)["b"] == "paused_guardrail"
    [(arm, evidence)] = arm_events(store, "paused_guardrail")
    check = evidence["checks"][0]
    assert arm == "b" and check["metric"] == "thumbs_down_rate"
    assert check["arm_value"] == 0.4 and check["champion_value"] == 0.1 and check["n"] == 400
    assert check["probability"] >= 0.95
    assert run.summary["arms"]["c"]["guardrails"]["thumbs_down_rate"]["breached"] is False

    rerun = run_optimizer(store, cfg, now=NOW + timedelta(hours=1), random_state=0)
    assert rerun is not None and rerun.paused == ()
    assert len(arm_events(store, "paused_guardrail")) == 1
    assert rerun.summary["arms"]["b"]["status"] == "paused_guardrail"


def test_an_arm_resumed_by_an_operator_is_judged_on_new_data_only(store: Store) -> None:
    cfg = config(guardrails=(DOWN,))
    register(store, cfg)
    add_sessions(store, "a", 200, turns=2, ups=360, downs=40)
    add_sessions(store, "b", 200, turns=2, ups=240, downs=160)
    add_sessions(store, "c", 200, turns=2, ups=360, downs=40)
    assert run_optimizer(store, cfg, now=NOW, random_state=0).paused == ("b",)  # type: ignore[union-attr]
    store.record_arm_event(EXPERIMENT, "b", "resumed", actor="op", at=NOW + timedelta(hours=1))
    later = NOW + timedelta(hours=2)
    kept = run_optimizer(store, cfg, now=later, random_state=0)
    assert kept is not None and kept.paused == () and "b" in kept.allocation["segments"]["*"]
    add_sessions(store, "b", 200, at=later, turns=2, ups=240, downs=160)  # still harmful
    again = run_optimizer(store, cfg, now=later + timedelta(hours=1), random_state=0)
    assert again is not None and again.paused == ("b",)
    assert len(arm_events(store, "paused_guardrail")) == 2


def test_the_champion_is_never_paused(store: Store) -> None:
    cfg = config(guardrails=(DOWN,))
    register(store, cfg)
    add_sessions(store, "a", 200, turns=2, ups=200, downs=200)  # the champion is the bad one
    add_sessions(store, "b", 200, turns=2, ups=380, downs=20)
    add_sessions(store, "c", 200, turns=2, ups=380, downs=20)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.paused == ()
    assert arm_events(store, "paused_guardrail") == []


def test_paused_and_retired_arms_get_no_traffic(store: Store) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    store.record_arm_event(EXPERIMENT, "a", "paused_operator", actor="op", at=T0)
    store.record_arm_event(EXPERIMENT, "c", "retired", actor="op", at=T0)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.allocation["segments"]["*"] == {"b": 1.0}
    assert run.summary["arms"]["a"]["status"] == "paused_operator"
    assert run.summary["arms"]["a"]["prob_best"] is None


def test_stop_recommendation_is_recorded_once(store: Store) -> None:
    cfg = config(stop_expected_loss=0.01)
    seed_clear_winner(store, cfg)
    first = run_optimizer(store, cfg, now=NOW, random_state=0)
    second = run_optimizer(store, cfg, now=NOW + timedelta(hours=1), random_state=1)
    assert first is not None and second is not None
    assert first.recommendation is not None and first.recommendation["arm"] == "a"
    assert second.summary["stop"]["recommended"] == "a" and second.promoted is None
    assert [arm for arm, _ in arm_events(store, "stop_recommended")] == ["a"]


def test_no_recommendation_when_arms_are_close(store: Store) -> None:
    cfg = config(stop_expected_loss=0.001)
    register(store, cfg)
    for arm in "abc":
        add_sessions(store, arm, 200, conversions=20)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.recommendation is None
    assert arm_events(store, "stop_recommended") == []


def test_auto_promote_makes_the_winner_champion(store: Store) -> None:
    cfg = config(stop_expected_loss=0.01, auto_promote=True, arms=("a", "b"), champion="b")
    register(store, cfg)
    add_sessions(store, "a", 300, conversions=90)
    add_sessions(store, "b", 300, conversions=15)
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.promoted == "a"
    assert store.arm_statuses(EXPERIMENT)["a"] == "champion"
    assert run.summary["champion"] == "a" and run.summary["arms"]["b"]["status"] == "active"
    again = run_optimizer(store, cfg, now=NOW + timedelta(hours=1), random_state=0)
    assert again is not None and again.promoted is None  # already the champion
    assert len(arm_events(store, "promoted")) == 1


def test_delay_model_learns_from_open_sessions(store: Store) -> None:
    cfg = config(delay="model", burn_in=20)
    register(store, cfg)
    young = NOW - timedelta(days=2)  # inside the 7-day window
    add_sessions(store, "a", 100, at=young, conversions=20, conversion_delay=timedelta(hours=2))
    add_sessions(store, "b", 100, at=young, conversions=2, conversion_delay=timedelta(hours=2))
    add_sessions(store, "c", 100, at=young, conversions=2, conversion_delay=timedelta(hours=2))
    waiting = run_optimizer(store, config(delay="wait", burn_in=20), now=NOW, random_state=0)
    modelled = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert waiting is not None and modelled is not None
    assert waiting.complete_sessions == 0 and not waiting.summary["burn_in_complete"]
    assert modelled.summary["delay"] == "model" and modelled.summary["burn_in_complete"]
    assert modelled.summary["arms"]["a"]["effective_sessions"] > 20
    assert modelled.allocation["segments"]["*"]["a"] > 0.5


def test_seeded_runs_are_identical(store: Store) -> None:
    cfg = config(burn_in=10)
    register(store, cfg)
    add_sessions(store, "a", 100, conversions=12)
    add_sessions(store, "b", 100, conversions=10)
    add_sessions(store, "c", 100, conversions=9)
    one = run_optimizer(store, cfg, now=NOW, random_state=11)
    two = run_optimizer(store, cfg, now=NOW, random_state=11)
    assert one is not None and two is not None
    assert one.allocation == two.allocation and one.summary["arms"] == two.summary["arms"]


def test_a_held_lock_means_no_run(store: Store) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with job_lock(store, LOCK) as held:
            assert held
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(30)
        assert run_optimizer(store, cfg, now=NOW) is None
        assert store.latest_snapshot(EXPERIMENT) is None
    finally:
        release.set()
        thread.join()
    assert run_optimizer(store, cfg, now=NOW) is not None  # released: the next run proceeds


def test_concurrent_runs_never_overlap(store: Store) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def worker() -> None:
        barrier.wait()
        results.append(run_optimizer(store, cfg, now=NOW, random_state=0))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = [r for r in results if r is not None]
    assert len(results) == 4 and len(ran) >= 1
    with store.engine.connect() as conn:
        versions = conn.execute(sa.select(schema.policy_snapshots.c.version)).scalars().all()
    assert sorted(versions) == list(range(1, len(ran) + 1))  # one snapshot per winning run


def test_a_lock_held_by_another_process_blocks_the_run(store: Store) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    code = (
        "import sys\n"
        "from optimizer.store import Store\n"
        "from optimizer.locks import job_lock\n"
        f"store = Store({store.url!r})\n"
        f"with job_lock(store, {LOCK!r}) as held:\n"
        "    print('held' if held else 'busy', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "held"
            assert run_optimizer(store, cfg, now=NOW) is None
        finally:
            child.stdin.write("\n")
            child.stdin.flush()
        assert child.wait(30) == 0
    assert run_optimizer(store, cfg, now=NOW) is not None


def test_cli_optimize_json(store: Store, tmp_path: Path) -> None:
    cfg = config()
    seed_clear_winner(store, cfg)
    toml = tmp_path / "flywheel.toml"
    toml.write_text(
        '[experiment]\nid = "exp"\nsalt = "exp"\nchampion = "a"\n'
        + "".join(f'[[experiment.arms]]\nid = "{a}"\nprompt = "{a}"\n' for a in "abc")
        + '[[kpi.terms]]\nname = "conversion"\nsource = "outcome:conversion"\nweight = 1.0\n'
        + "[policy]\nburn_in = 50\nchallenger_min_sessions = 0\n"
    )
    runner = CliRunner()
    args = ["optimize", "--config", str(toml), "--database-url", store.url, "--seed", "3"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ran"] is True and out["snapshot_version"] == 1 and out["sessions"] == 900
    assert out["allocation"]["segments"]["*"]["a"] > 0.5
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "Snapshot" in table.stdout
    with job_lock(store, LOCK):
        busy = runner.invoke(app, [*args, "--json"])
    assert busy.exit_code == 3 and json.loads(busy.stdout)["ran"] is False


def test_a_run_turns_the_few_shot_flywheel(store: Store) -> None:
    """The optimizer job mines a thumbed-up, converted turn into the bank, scrubbed."""
    from optimizer.fewshot import ExampleBank
    from optimizer.store import ArmSpec
    from tests.support.fewshot_scenario import LATER, add_session
    from tests.support.fewshot_scenario import make_config as fewshot_config

    config = fewshot_config()
    store.sync_experiment("exp", "exp", [ArmSpec("concise", "concise", "h")])
    question = "How do I export all my projects? I'm Jane Miller, jane@example.org"
    answer = "Go to Settings > Data > Export and pick CSV or JSON for all your projects."
    turn_ids = add_session(
        store, "s1", [(question, answer)], votes={0: 1}, outcomes={"conversion": 1}
    )

    run = run_optimizer(store, config, now=LATER, random_state=0)

    assert run is not None
    assert len(run.fewshot["mined"]) == 1
    example = ExampleBank(store).get(run.fewshot["mined"][0])
    assert example is not None
    assert example.turn_id == turn_ids[0]
    assert "jane@example.org" not in example.user_text and "<EMAIL>" in example.user_text
    assert "Jane Miller" not in example.user_text
    # A second run mines nothing new: the turn is already in the bank.
    again = run_optimizer(store, config, now=LATER, random_state=0)
    assert again is not None and again.fewshot["mined"] == []


def test_promotion_closes_the_loop_on_every_replica(store: Store) -> None:
    from optimizer.fewshot.proposal import _champion

    cfg = config(stop_expected_loss=0.01, auto_promote=True, champion="b", retire_min_sessions=250)
    seed_clear_winner(store, cfg)  # a converts 30%, b 5%, c 4%, 300 sessions each
    assert _champion(store, cfg).id == "b"  # the file's champion, promoted by nobody yet
    run = run_optimizer(store, cfg, now=NOW, random_state=0)
    assert run is not None and run.promoted == "a"
    assert run.summary["stop"]["retired"] == ["b", "c"]  # P(best) ~0 after 250+ sessions
    (_, evidence), *_ = arm_events(store, "retired")
    assert evidence["winner"] == "a" and evidence["prob_best"] < 0.01
    replica = Store(store.url)  # another replica: its own connections, same database
    try:
        assert replica.arm_statuses(EXPERIMENT) == {"a": "champion", "b": "retired", "c": "retired"}
        served = Assigner(replica, EXPERIMENT, salt=EXPERIMENT, snapshot_ttl_s=0)
        assert {served.assign(f"s-{i}", f"u-{i}").arm_id for i in range(20)} == {"a"}
        # what builds on "the champion" uses the promoted one at once
        assert _champion(replica, cfg).id == "a"
    finally:
        replica.dispose()
