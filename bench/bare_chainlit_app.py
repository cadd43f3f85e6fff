"""The baseline of ``bench/load.py``: a bare Chainlit app, as small as a chat app can be.

``@cl.on_message`` streams a fixed 26-token reply with ``stream_token``, the
first token after :data:`FIRST_S` and the others :data:`DELAY_S` apart — the
timing of ``fake/echo?delay_ms=20&first_ms=20`` answering
:data:`bench.load.MESSAGE` — then sends the message. No login, no data layer,
no model: what Chainlit itself costs per turn. Run by ``bench/load.py`` as
``chainlit run bench/bare_chainlit_app.py --headless`` in a scratch folder.
"""

from __future__ import annotations

import asyncio
import os

import chainlit as cl

#: Seconds before the first token and between tokens (``fake/echo``'s first_ms, delay_ms).
FIRST_S = float(os.environ.get("BARE_FIRST_MS", "20")) / 1000
DELAY_S = float(os.environ.get("BARE_DELAY_MS", "20")) / 1000
#: What ``fake/echo`` answers to bench/load.py's message: "You asked: " and its 24 words.
REPLY = (
    "You asked: I would like to export every one of my open tasks to a spreadsheet "
    "so that my whole team can review them together (1)"
)
#: Split as ``fake/echo`` splits: each word with the whitespace before it.
TOKENS = [word if i == 0 else f" {word}" for i, word in enumerate(REPLY.split())]
assert len(TOKENS) == 26, len(TOKENS)


@cl.on_message
async def on_message(message: cl.Message) -> None:
    answer = cl.Message(content="")
    await asyncio.sleep(FIRST_S)
    for i, token in enumerate(TOKENS):
        if i:
            await asyncio.sleep(DELAY_S)
        await answer.stream_token(token)
    await answer.send()
