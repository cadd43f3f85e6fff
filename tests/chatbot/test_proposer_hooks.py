"""The serving side of the proposer: the model process's idle signal and restart hook."""

from __future__ import annotations


def test_model_process_counts_jobs_in_flight() -> None:
    import threading

    from chatbot.llm.local import ModelProcess

    proc = ModelProcess()
    gate = threading.Event()
    try:
        assert proc.in_flight == 0
        first = proc.submit(gate.wait, 5)
        second = proc.submit(lambda: None)
        assert proc.in_flight == 2
        gate.set()
        first.result(5)
        second.result(5)
        assert proc.in_flight == 0
    finally:
        gate.set()
        proc.stop()


def test_hooks_call_the_model_through_litellm_and_replay_as_the_chat() -> None:
    from chatbot.llm.proposer import make_hooks
    from optimizer.config import ModelConfig, load_config

    config = load_config("/nonexistent.toml", environ=False).model_copy(
        update={"model": ModelConfig(name="fake/echo", retries=0, timeout_s=30)}
    )
    hooks = make_hooks(config, knowledge="Facts: the Team plan is $8.")
    assert hooks.idle()  # not a local model: nothing to protect
    done = hooks.complete(
        [{"role": "user", "content": "Rewrite this."}],
        model="fake/echo",
        max_tokens=50,
        temperature=0.5,
    )
    assert done.error is None and done.text == "You asked: Rewrite this." and done.latency_ms > 0
    assert hooks.reply is not None
    replay = hooks.reply("You are brief.", "How much is Team?")
    assert replay.error is None and "How much is Team?" in replay.text
    failed = hooks.complete(
        [{"role": "user", "content": "x"}], model="fake/error-400", max_tokens=5, temperature=0
    )
    assert failed.text == "" and failed.error is not None and "400" in failed.error
