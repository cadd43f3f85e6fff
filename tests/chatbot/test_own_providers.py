"""Our in-process providers are streamed without litellm's wrapper, with the same results.

``stream_reply`` iterates the chunks of ``fake/…`` and ``local/…`` itself
(chatbot.llm.streaming); every other model goes through ``litellm.acompletion``.
The fake provider registered a second time under another prefix (``viallm/…``:
litellm's own custom-provider mechanism, nothing of ours replaced) is reached
through litellm, so each behaviour can be compared both ways.
"""

from __future__ import annotations

import uuid
from typing import Any

import litellm
import pytest

from chatbot.llm.fake import FakeProvider
from chatbot.llm.streaming import Completion, register_providers, stream_reply
from optimizer.config import ModelConfig

MESSAGES = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": "How do I export my tasks?"},
]
VIA_LITELLM = "viallm"


@pytest.fixture(scope="module", autouse=True)
def second_prefix() -> None:
    register_providers()
    if VIA_LITELLM not in {p["provider"] for p in litellm.custom_provider_map}:
        litellm.custom_provider_map.append(
            {"provider": VIA_LITELLM, "custom_handler": FakeProvider()}
        )
        litellm.utils.custom_llm_setup()  # litellm reads the map into its provider list


async def _reply(name: str, **options: Any) -> tuple[Completion, list[str]]:
    tokens: list[str] = []

    async def on_token(text: str) -> None:
        tokens.append(text)

    settings: dict[str, Any] = {"timeout_s": 30, "retries": 1, "max_tokens": 32, **options}
    model = ModelConfig(name=name, **settings)
    return await stream_reply(MESSAGES, model=model, on_token=on_token), tokens


@pytest.mark.parametrize(
    "behaviour",
    [
        "echo",
        "echo?delay_ms=2",
        "empty",
        "429",
        "error-400",
        "error-503",
        "echo?fail_after=2&status=500",
        "timeout?first_ms=50",
    ],
)
async def test_a_fake_model_answers_the_same_directly_and_through_litellm(
    behaviour: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    sep = "&" if "?" in behaviour else "?"
    direct, direct_tokens = await _reply(f"fake/{behaviour}{sep}tag={tag}")
    routed, routed_tokens = await _reply(f"{VIA_LITELLM}/{behaviour}{sep}tag={tag}")

    assert direct_tokens == routed_tokens
    assert direct.text == routed.text
    assert (direct.prompt_tokens, direct.completion_tokens) == (
        routed.prompt_tokens,
        routed.completion_tokens,
    )
    assert direct.partial == routed.partial
    assert (direct.error is None) == (routed.error is None)
    if direct.error is not None:
        assert direct.error.replace("fake/", VIA_LITELLM + "/") == routed.error
