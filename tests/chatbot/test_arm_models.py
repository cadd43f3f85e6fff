"""An arm's own model on the chat path: its name and parameters reach the provider through
litellm, the allow-list is enforced at serve time, fallback turns stay the arm's, cost is priced.

The provider is a recording OpenAI-compatible server on 127.0.0.1 (tests.support.openai_recorder).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from chatbot.conversation import Conversation
from chatbot.runtime import Runtime
from optimizer.config import ArmConfig, Config, ModelPriceConfig
from optimizer.prompt_library import arm_spec
from optimizer.store import ArmSpec, Store, schema
from tests.support.chat_helpers import CONCISE, RecordingTracer, chat_config
from tests.support.openai_recorder import Recorder

HOSTED = "openai/my-hosted-model"


@pytest.fixture
def server() -> Iterator[Recorder]:
    srv = Recorder()
    srv.reply = "Hosted answer here."
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")


def _config(store: Store, base: str, arms: tuple[ArmConfig, ...], **model: object) -> Config:
    """The chat test configuration with these arms, validated (the allow-list check included)."""
    data = chat_config(store.url).model_dump()
    data["model"].update(allowed_api_bases=[base], **model)
    data["experiment"].update(arms=[a.model_dump() for a in arms], champion=arms[0].id)
    return Config.model_validate(data)


def _runtime(store: Store, config: Config) -> Runtime:
    return Runtime.build(config, store=store, tracer=RecordingTracer(), migrate=False)


def _turns(store: Store) -> list[sa.Row]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(schema.turns).order_by(schema.turns.c.created_at)))


async def _reply(runtime: Runtime, text: str = "How much is the Team plan?") -> Conversation:
    conversation = await Conversation.start(runtime, str(uuid.uuid4()), "alice", {})
    await conversation.reply(f"turn-{uuid.uuid4().hex[:8]}", text)
    return conversation


async def test_an_arm_with_its_own_model_is_answered_by_it(store: Store, server: Recorder) -> None:
    hosted = ArmConfig(
        id="hosted",
        prompt="concise",
        model=HOSTED,
        temperature=0.15,
        max_tokens=77,
        api_base=server.base,
    )
    prices = {HOSTED: ModelPriceConfig(input_usd_per_mtok=1000.0, output_usd_per_mtok=2000.0)}
    config = _config(store, server.base, (hosted,), prices=prices)
    runtime = _runtime(store, config)
    conversation = await _reply(runtime)
    assert conversation.assignment.arm_id == "hosted"
    assert conversation.history[-1]["content"] == "Hosted answer here."
    (chat,) = [r for r in server.requests if r["path"].endswith("/chat/completions")]
    sent = json.loads(chat["body"])
    assert sent["model"] == "my-hosted-model" and sent["stream"] is True
    assert (sent["temperature"], sent["max_tokens"]) == (0.15, 77)
    (turn,) = _turns(store)
    assert (turn.arm_id, turn.model, turn.fallback) == ("hosted", HOSTED, False)
    assert (turn.prompt_tokens, turn.completion_tokens) == (9, 3)
    # the configured price makes the KPI's cost: 9 x 1000 + 3 x 2000 per million tokens
    from optimizer import kpi

    frame = kpi.session_frame(store, config, with_cost=True)
    assert frame["cost_usd"].tolist() == [pytest.approx(0.015)]


async def test_an_arm_without_a_model_serves_the_configured_one(
    store: Store, server: Recorder
) -> None:
    runtime = _runtime(store, _config(store, server.base, (CONCISE,)))
    await _reply(runtime)
    (turn,) = _turns(store)
    assert (turn.arm_id, turn.model) == ("concise", "fake/echo")
    assert server.requests == []


async def test_a_stored_arm_with_a_forbidden_api_base_never_reaches_it(
    store: Store, server: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(store, _config(store, server.base, (CONCISE,)))
    # an arm written by a deployment with a longer allow-list (or by hand)
    row = arm_spec(CONCISE, runtime.prompts)
    spec = ArmSpec(
        "concise",
        row.prompt_id,
        row.prompt_hash,
        prompt_text=row.prompt_text,
        model=HOSTED,
        model_params={"api_base": "http://127.0.0.2:9/v1"},
    )
    new_id, _ = store.add_arm("exp", spec, actor="test")
    runtime.arms_refresh_s = 0
    with caplog.at_level(logging.ERROR, logger="chatbot.runtime"):
        model, base = runtime.serve_model(new_id)
    assert (model.name, base) == ("fake/echo", None)
    assert "allowed_api_bases" in caplog.text
    assert server.requests == []


async def test_a_fallback_turn_stays_the_arms_and_says_so(store: Store, server: Recorder) -> None:
    failing = ArmConfig(id="failing", prompt="concise", model="fake/error-500")
    config = _config(store, server.base, (failing,), fallback="fake/echo")
    runtime = _runtime(store, config)
    conversation = await _reply(runtime)
    (turn,) = _turns(store)
    assert (turn.arm_id, turn.model, turn.fallback, turn.error) == (
        "failing",
        "fake/echo",
        True,
        None,
    )
    assert conversation.assignment.arm_id == "failing"
    assert runtime.store.arm_statuses("exp") == {"failing": "champion"}


@pytest.mark.slow
async def test_two_arms_on_two_local_gguf_models_share_one_model_process(
    store: Store, tmp_path: Path
) -> None:
    """Several local models: the packaged GGUF and another file, served by the same process."""
    from chatbot.llm.local import model_path, model_process

    other = tmp_path / "other-model.gguf"
    other.symlink_to(model_path("gemma3-270m"))
    arms = (
        ArmConfig(id="packaged", prompt="concise", model="local/gemma3-270m", max_tokens=8),
        ArmConfig(id="other", prompt="concise", model=f"local/{other}", max_tokens=8),
    )
    data = chat_config(store.url).model_dump()
    data["model"].update(timeout_s=120)
    data["experiment"].update(arms=[a.model_dump() for a in arms], champion="packaged")
    runtime = _runtime(store, Config.model_validate(data))
    served = set()
    for i in range(40):  # users hash onto both arms
        conversation = await Conversation.start(runtime, f"s{i}", f"user-{i}", {})
        if conversation.assignment.arm_id in served:
            continue
        await conversation.reply(f"t{i}", "Hi")
        served.add(conversation.assignment.arm_id)
        if len(served) == 2:
            break
    turns = {t.arm_id: t for t in _turns(store)}
    assert set(turns) == {"packaged", "other"}
    assert turns["packaged"].model == "local/gemma3-270m"
    assert turns["other"].model == f"local/{other}"
    assert all(t.error is None and t.reply.strip() for t in turns.values())
    assert model_process().status()["state"] == "ready" and model_process().restarts == 0
