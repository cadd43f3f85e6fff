"""A chat user's privacy controls: opt out of training, delete one of their conversations.

Both go through :mod:`optimizer.consent` (the same path as ``flywheel privacy``):
recorded, audited, and from then on the user's (or the conversation's) text never
enters a training set, an export or the few-shot bank; examples already mined
from it leave the bank.

- In the chat: a settings switch (:data:`TRAINING_SETTING`, the gear by the
  message box) sent at chat start with the stored choice; the Chainlit app's
  ``on_settings_update`` calls :func:`set_training`. Deleting a conversation is
  Chainlit's own history menu, answered by :data:`privacy_router`.
- Over HTTP (signed in with the chat's cookie): ``GET``/``PUT /privacy``
  (``{"training": bool}``) and ``DELETE /project/thread`` (``{"threadId": …}``),
  which replaces Chainlit's route (``create_app`` includes this router before
  Chainlit is mounted) to answer a conversation of someone else with 403 and a
  reason, an unknown one with 404, instead of Chainlit's bare 401.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from chainlit.auth import get_current_user
from chainlit.types import DeleteThreadRequest
from chainlit.user import PersistedUser, User
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool

from chatbot.runtime import Runtime
from chatbot.web.datalayer import acting_as, current_data_layer
from optimizer import consent

__all__ = [
    "TRAINING_LABEL",
    "TRAINING_SETTING",
    "privacy_router",
    "set_training",
    "training_allowed",
]

log = logging.getLogger(__name__)

#: Id of the chat settings switch; ':' keeps it apart from anything Chainlit names.
TRAINING_SETTING = "flywheel:training"
TRAINING_LABEL = "Let my conversations help improve the assistant"

privacy_router = APIRouter(include_in_schema=False)


def training_allowed(runtime: Runtime, user_id: str) -> bool:
    """Whether ``user_id`` lets their conversations become data (the switch's position)."""
    return not consent.is_opted_out(runtime.store, user_id)


def set_training(runtime: Runtime, user_id: str, allowed: bool) -> str | None:
    """Record the user's choice (they are the actor); what to tell them, None if unchanged.

    The chat's settings form sends every value on each confirm: an unchanged
    choice writes nothing (no audit row, no message).
    """
    if training_allowed(runtime, user_id) == allowed:
        return None
    withdrawn = consent.set_training_consent(runtime.store, user_id, allowed, actor=user_id)
    log.info("user %s %s training", user_id, "allowed" if allowed else "opted out of")
    if allowed:
        return "Thanks: your conversations may now help improve the assistant."
    return "Done: your conversations will not be used to train or improve the assistant" + (
        f" ({len(withdrawn)} examples taken from them were withdrawn)." if withdrawn else "."
    )


class TrainingChoice(BaseModel):
    """``PUT /privacy``: whether the caller's conversations may become data."""

    model_config = ConfigDict(extra="forbid")
    training: StrictBool


def _signed_in(user: User | PersistedUser | None, what: str) -> str:
    if user is None:
        raise HTTPException(401, f"sign in to {what}")
    return user.identifier


@privacy_router.get("/privacy")
async def get_privacy(
    user: User | PersistedUser | None = Depends(get_current_user),
) -> dict[str, Any]:
    who = _signed_in(user, "see your privacy settings")
    allowed = await asyncio.to_thread(training_allowed, current_data_layer().runtime, who)
    return {"user": who, "training": allowed}


@privacy_router.put("/privacy")
async def put_privacy(
    choice: TrainingChoice, user: User | PersistedUser | None = Depends(get_current_user)
) -> dict[str, Any]:
    who = _signed_in(user, "change your privacy settings")
    message = await asyncio.to_thread(
        set_training, current_data_layer().runtime, who, choice.training
    )
    return {"user": who, "training": choice.training, "message": message or "unchanged"}


@privacy_router.delete("/project/thread")
async def delete_thread(
    payload: DeleteThreadRequest, user: User | PersistedUser | None = Depends(get_current_user)
) -> JSONResponse:
    who = _signed_in(user, "delete a conversation")
    layer = current_data_layer()
    author = await layer.get_thread_author(payload.threadId)
    if not author:
        raise HTTPException(404, f"no conversation {payload.threadId!r}")
    if author != who:
        raise HTTPException(403, "you can delete only your own conversations")
    with acting_as(who):
        await layer.delete_thread(payload.threadId)
    return JSONResponse({"success": True})
