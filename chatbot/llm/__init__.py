"""LLM calls: one streamed reply through litellm, and the providers we run ourselves.

- :mod:`chatbot.llm.streaming` — :func:`~chatbot.llm.streaming.stream_reply`, the only way
  the chat path calls a model (retries, fallback, deadline, friendly errors);
- :mod:`chatbot.llm.messages` — the prompt: variant, few-shot examples, history, budget;
- :mod:`chatbot.llm.base` — the base of our litellm providers;
- :mod:`chatbot.llm.local` (the supervised model process) and
  :mod:`chatbot.llm.local_worker` (llama.cpp in that process), :mod:`chatbot.llm.fake`.

Imports go one way: ``streaming`` → providers → ``base``. This package imports
nothing at import time, so the model process does not load litellm.
"""
