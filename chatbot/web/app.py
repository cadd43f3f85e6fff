"""The Chainlit app: thin handlers over :mod:`chatbot.conversation`.

Loaded by :func:`chatbot.web.server.create_app` (through ``mount_chainlit``) after
the process runtime is installed, so handlers find it with
:func:`chatbot.runtime.get_runtime`. Identity: session id = Chainlit thread
id, user id = the login name, turn id = the ``on_message`` run step id, which
is what Chainlit's thumbs send as ``forId``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import chainlit as cl
from chainlit.input_widget import InputWidget, Switch
from chainlit.types import ThreadDict

from chatbot.conversation import Conversation, TokenBatcher
from chatbot.llm.streaming import FRIENDLY_ERROR
from chatbot.runtime import get_runtime
from chatbot.web import overload
from chatbot.web.auth import Authenticator
from chatbot.web.datalayer import FlywheelDataLayer
from chatbot.web.privacy import TRAINING_LABEL, TRAINING_SETTING, set_training, training_allowed
from optimizer.store.accounts import Accounts

log = logging.getLogger("chatbot.web.app")  # Chainlit loads this file under its path as __name__

#: Name of the "my issue is solved" action; ':' keeps it apart from configured action names.
RESOLVED_ACTION = "flywheel:resolved"


@cl.data_layer
def data_layer() -> FlywheelDataLayer:
    return FlywheelDataLayer(get_runtime())


@cl.password_auth_callback
async def login(username: str, password: str) -> cl.User | None:
    """Chainlit's ``POST /login`` (throttled in front of it: chatbot.web.throttle)."""
    runtime = get_runtime()
    checker = Authenticator(runtime.config.auth, Accounts(runtime.store.engine))
    who = await asyncio.to_thread(checker.check, username, password)  # bcrypt: off the loop
    if who is None:
        return None
    return cl.User(identifier=who.name, metadata={**who.attributes, "role": who.role})


def _context(user: cl.User | None) -> dict[str, Any]:
    context: dict[str, Any] = {"channel": "web"}
    if user is not None:  # the login's attributes (chatbot.web.auth.Login): its segment values
        context.update({k: v for k, v in (user.metadata or {}).items() if k != "role"})
    return context


async def _open_conversation() -> Conversation:
    user = cl.user_session.get("user")
    conversation = await Conversation.start(
        get_runtime(), cl.context.session.thread_id, user.identifier, _context(user)
    )
    cl.user_session.set("conversation", conversation)
    return conversation


async def _conversation() -> Conversation:
    return cl.user_session.get("conversation") or await _open_conversation()


async def _send_settings() -> None:
    """The privacy switch (chat settings), at the user's stored choice."""
    user = cl.user_session.get("user")
    if user is None:
        return
    allowed = await asyncio.to_thread(training_allowed, get_runtime(), user.identifier)
    inputs: list[InputWidget] = [Switch(id=TRAINING_SETTING, label=TRAINING_LABEL, initial=allowed)]
    await cl.ChatSettings(inputs).send()


@cl.on_chat_start
async def on_chat_start() -> None:
    # No assignment yet: a session starts with its first message (on_message), so a page
    # load without a question is no session, and the KPI's denominator holds only chats.
    cl.user_session.set("conversation", None)
    await _send_settings()


@cl.on_chat_resume
async def on_chat_resume(thread: ThreadDict) -> None:
    await _open_conversation()  # same thread id: the stored assignment and turns come back
    await _send_settings()


@cl.on_settings_update
async def on_settings_update(settings: dict[str, Any]) -> None:
    user = cl.user_session.get("user")
    if user is None or TRAINING_SETTING not in settings:
        return
    allowed = bool(settings[TRAINING_SETTING])
    message = await asyncio.to_thread(set_training, get_runtime(), user.identifier, allowed)
    if message is not None:
        await cl.Message(content=message, author="Flywheel").send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    with overload.current().turn() as admitted:
        if not admitted:  # overloaded: say so now rather than answer everyone late
            await cl.ErrorMessage(content=overload.BUSY_MESSAGE).send()
            return
        await _answer(message)


async def _answer(message: cl.Message) -> None:
    answer = cl.Message(content="")
    tokens = TokenBatcher(answer.stream_token)  # a socket emit per batch, not per token
    try:
        conversation = await _conversation()
        try:
            reply = await conversation.reply(
                cl.context.current_run.id, message.content, on_token=tokens
            )
        finally:
            await tokens.close()
    except Exception:  # e.g. the database is down: say sorry, never show internals
        log.exception("turn failed")
        await cl.ErrorMessage(content=FRIENDLY_ERROR).send()
        return
    answer.content = reply.text  # refusals and errors were not streamed
    if reply.turn is not None and not reply.failed:
        answer.actions = _actions(reply.turn.id)
    await answer.send()


def _actions(turn_id: str) -> list[cl.Action]:
    config = get_runtime().config
    buttons = [(a.name, a.label) for a in config.actions] + [
        (RESOLVED_ACTION, config.resolved_label)
    ]
    return [
        cl.Action(name=name, label=label, payload={"turn_id": turn_id}) for name, label in buttons
    ]


async def on_action(action: cl.Action) -> None:
    turn_id = (action.payload or {}).get("turn_id")
    try:
        conversation = await _conversation()
        if action.name == RESOLVED_ACTION:
            result = await conversation.resolve(turn_id=turn_id)
        else:
            configured = {a.name: a for a in get_runtime().config.actions}[action.name]
            result = await conversation.click(configured, turn_id=turn_id)
    except Exception:
        log.exception("action %s failed", action.name)
        await cl.ErrorMessage(content="Sorry — that did not go through. Please try again.").send()
        return
    await cl.Message(content=result.message, author="Flywheel").send()


for _name in [a.name for a in get_runtime().config.actions] + [RESOLVED_ACTION]:
    cl.action_callback(_name)(on_action)
