"""The thumbs routes: ``PUT``/``DELETE /feedback``, checked against the caller.

Chainlit's own feedback routes do not check that ``forId`` is a step of the
caller's own thread, and turn any exception into a 500. :data:`feedback_router`
replaces both (``create_app`` includes it before Chainlit is mounted, so it
wins), names the caller, and answers a vote on someone else's turn with 403 and
a reason, too many votes with 429, a malformed one with 422.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from chainlit.auth import get_current_user
from chainlit.types import DeleteFeedbackRequest, UpdateFeedbackRequest
from chainlit.user import PersistedUser, User
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from chatbot.web.datalayer import acting_as, current_data_layer
from chatbot.web.ratelimit import RateLimitExceeded
from optimizer.errors import OwnershipError

__all__ = ["feedback_router"]

T = TypeVar("T")

feedback_router = APIRouter(include_in_schema=False)


async def _as_caller(user: User | PersistedUser | None, call: Callable[[], Awaitable[T]]) -> T:
    """Run a feedback method as ``user``, mapping refusals to 4xx with a reason."""
    if user is None:
        raise HTTPException(401, "sign in to rate replies")
    try:
        with acting_as(user.identifier):
            return await call()
    except OwnershipError as exc:
        raise HTTPException(
            403, f"you can rate only replies in your own conversations ({exc})"
        ) from None
    except RateLimitExceeded as exc:
        raise HTTPException(
            429, f"too many votes: {exc}", headers={"Retry-After": f"{exc.retry_after_s:.0f}"}
        ) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@feedback_router.put("/feedback")
async def put_feedback(
    update: UpdateFeedbackRequest, user: User | PersistedUser | None = Depends(get_current_user)
) -> JSONResponse:
    layer = current_data_layer()
    feedback_id = await _as_caller(user, lambda: layer.upsert_feedback(update.feedback))
    return JSONResponse({"success": True, "feedbackId": feedback_id})


@feedback_router.delete("/feedback")
async def remove_feedback(
    payload: DeleteFeedbackRequest, user: User | PersistedUser | None = Depends(get_current_user)
) -> JSONResponse:
    layer = current_data_layer()
    await _as_caller(user, lambda: layer.delete_feedback(payload.feedbackId))
    return JSONResponse({"success": True})
