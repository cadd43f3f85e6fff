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
