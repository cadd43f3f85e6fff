"""A user's say over their data: opt out of training, delete a conversation.

The one path for the chat (its settings switch and thread delete, through
:mod:`chatbot.web`) and the CLI (``flywheel privacy``). Each action is recorded
in the store (:meth:`Store.set_opt_out`, :meth:`Store.delete_conversation`,
audited) — from then on the conversations never enter a training set, an export
or the few-shot miner (:mod:`optimizer.store.consent` holds those queries) —
and also withdraws what was already taken from them: examples mined from those
sessions into the few-shot bank are rejected (with the reason in their event),
so no other user is shown them again. Their sessions still count for the KPI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import sqlalchemy as sa

from optimizer.fewshot.bank import ExampleBank
from optimizer.store import Store, schema

__all__ = ["delete_conversation", "is_opted_out", "set_training_consent"]

log = logging.getLogger(__name__)

#: Bank statuses an example can be served or promoted from (``rejected`` is final).
_LIVE = ("candidate", "approved", "pinned", "demoted")


def is_opted_out(store: Store, user_id: str) -> bool:
    """Whether ``user_id``'s latest choice keeps their conversations out of the data."""
    from optimizer.store.consent import opted_out_users

    with store.engine.connect() as conn:
        return user_id in opted_out_users(conn)


def set_training_consent(store: Store, user_id: str, allowed: bool, *, actor: str) -> list[str]:
    """Let (``allowed``) or stop ``user_id``'s conversations becoming data.

    Opting out also withdraws the user's mined examples from the bank; returns
    their ids. Raises ``ValueError`` for an empty user id.
    """
    store.set_opt_out(user_id, not allowed, actor=actor)
    if allowed:
        return []
    a = schema.assignments
    return _withdraw(store, sa.select(a.c.session_id).where(a.c.user_id == user_id), actor)


def delete_conversation(store: Store, thread_id: str, *, user_id: str, actor: str) -> list[str]:
    """Mark ``thread_id`` deleted and withdraw the examples mined from it; returns their ids.

    The caller checks that ``user_id`` owns the conversation (the chat's data
    layer does; the CLI is an operator's tool).
    """
    if not thread_id:
        raise ValueError("thread_id must be a non-empty string")
    store.delete_conversation(thread_id, user_id=user_id, actor=actor)
    a = schema.assignments
    # a moved conversation's sessions are "<thread>~n", all with thread_id = the thread
    thread = sa.func.coalesce(a.c.thread_id, a.c.session_id)
    return _withdraw(store, sa.select(a.c.session_id).where(thread == thread_id), actor)


def _withdraw(store: Store, sessions: sa.Select[tuple[str]], actor: str) -> list[str]:
    ex = schema.examples
    with store.engine.connect() as conn:
        ids = list(
            conn.execute(
                sa.select(ex.c.id).where(
                    ex.c.source == "mined", ex.c.status.in_(_LIVE), ex.c.session_id.in_(sessions)
                )
            ).scalars()
        )
    return _reject(store, ids, actor)


def _reject(store: Store, ids: Iterable[str], actor: str) -> list[str]:
    bank = ExampleBank(store)
    done = []
    for example_id in ids:
        bank.set_status(example_id, "rejected", actor=actor, reason="consent withdrawn")
        done.append(example_id)
    if done:
        log.info("withdrew %d mined examples from the bank (consent)", len(done))
    return done
