"""What one process needs to chat, built once: config, store, prompts, assignment, tracer.

The Chainlit app, the outcomes API and the terminal REPL (``flywheel chat``)
share one :class:`Runtime`. :meth:`Runtime.build` loads and validates the
prompt files (a bad file fails here, naming the file and field), migrates the
store, registers the experiment's arms and the LLM providers. The web server
installs its runtime with :func:`set_runtime`; Chainlit handlers, which
Chainlit calls without arguments, find it with :func:`get_runtime`.

Recording a vote or an outcome goes through the runtime too, so the store
write and its Langfuse mirror stay in one place: the tracer is called only
after the store committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from chatbot.langfuse.tracer import Tracer, get_tracer
from optimizer.alerts import Alert, AlertDeliverer
from optimizer.assignment import Assigner
from optimizer.clock import utcnow
from optimizer.config import ArmConfig, Config, ModelConfig
from optimizer.errors import ConfigError
from optimizer.fewshot import ExampleSelector
from optimizer.finetune import FineTuneHooks
from optimizer.models import resolve as resolve_model
from optimizer.prompt_library import PromptLibrary, Variant, arm_spec, load_prompts
from optimizer.proposer import ProposerHooks
from optimizer.store import OutcomeRecord, Store, TurnRecord, VoteRecord, schema
from optimizer.store.versions import successor

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "GroupCommitter",
    "Runtime",
    "best_effort",
    "experiment_arms",
    "get_runtime",
    "set_runtime",
    "storable_text",
]


def experiment_arms(config: Config, prompts: PromptLibrary) -> dict[str, ArmConfig]:
    """The configured arms, or one arm per prompt variant when none are configured.

    Every arm must name a known prompt variant, else :class:`ConfigError` names
    the arm. (Example ids of ``fixed`` arms may be bank ids: the selector checks
    them, see :meth:`Runtime.build`.)

    >>> from optimizer.prompt_library import load_prompts
    >>> sorted(experiment_arms(Config(), load_prompts("prompts")))
    ['concise', 'empathetic', 'proactive-upsell']
    """
    arms = config.experiment.arms or tuple(
        ArmConfig.model_validate({"id": v, "prompt": v}) for v in sorted(prompts.variants)
    )
    for arm in arms:
        if arm.prompt not in prompts.variants:
            raise ConfigError(
                f"{config.source}: experiment.arms {arm.id!r}: prompt {arm.prompt!r} is not a "
                f"variant in {config.prompts_dir}/variants (known: {sorted(prompts.variants)})"
            )
    return {arm.id: arm for arm in arms}


def _served(row: Any, prompts: PromptLibrary) -> tuple[ArmConfig, Variant]:
    """What a stored arm version serves: its few-shot settings and its stored prompt text."""
    cfg = dict(row.fewshot_config or {})
    arm = ArmConfig.model_validate(
        {
            "id": row.base_id or row.id,
            "prompt": row.prompt_id,
            "fewshot": row.fewshot,
            **({"examples": cfg["examples"]} if "examples" in cfg else {}),
            **{k: cfg[k] for k in ("k", "reward_weighted") if k in cfg},
        }
    )
    if row.prompt_text:
        variant = Variant(row.prompt_id, "", row.prompt_text, row.prompt_hash, f"store:{row.id}")
    else:  # a row from before arm versions: the prompt file
        variant = prompts.variant(row.prompt_id)
    return arm, variant


@dataclass
class Runtime:
    """The services of one chat process. Build with :meth:`build`."""

    config: Config
    store: Store
    prompts: PromptLibrary
    arms: dict[str, ArmConfig]
    assigner: Assigner
    selector: ExampleSelector
    tracer: Tracer
    #: Webhook alerts (``[[alerts]]``), delivered in the background; None without targets.
    alerts: AlertDeliverer | None = None
    #: The proposer's link to the model (``optimizer.proposer``); None with the proposer off.
    proposer_hooks: ProposerHooks | None = None
    #: Fine-tuning for the optimizer job: follow jobs, retrain on schedule (``[finetune]``).
    finetune_hooks: FineTuneHooks | None = None
    #: Seconds between re-reads of the store's arm versions on the chat path.
    arms_refresh_s: float = 5.0
    _stored: dict[str, Any] = field(default_factory=dict, repr=False)
    _stored_at: float = field(default=-1e18, repr=False)
    _stored_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _turns: GroupCommitter[TurnRecord, bool] | None = field(default=None, repr=False)
    _votes: GroupCommitter[VoteRecord, Exception | None] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        store: Store | None = None,
        tracer: Tracer | None = None,
        migrate: bool = True,
    ) -> Runtime:
        """Validate prompts and arms, migrate the store, sync the experiment, register providers.

        Raises :class:`ConfigError` for a bad prompt file or arm (unknown
        prompt, unknown example id of a ``fixed`` arm).
        """
        from chatbot.llm.streaming import register_providers

        prompts = load_prompts(config.prompts_dir)
        arms = experiment_arms(config, prompts)
        store = store if store is not None else Store(config.database_url)
        if migrate:
            store.upgrade()
        runtime = cls(
            config=config,
            store=store,
            prompts=prompts,
            arms=arms,
            assigner=Assigner(
                store,
                config.experiment.id,
                salt=config.experiment.salt,
                segment_by=config.experiment.segment_by,
                champion=config.experiment.champion,
                holdback=config.experiment.holdback,
                baseline=config.experiment.baseline_arm or next(iter(arms)),
            ),
            selector=ExampleSelector(prompts, store, refresh_s=config.fewshot.refresh_s),
            tracer=tracer if tracer is not None else get_tracer(config),
        )
        for arm in arms.values():
            if arm.fewshot == "fixed":
                runtime.selector.select(
                    arm, ""
                )  # unknown example ids: ConfigError now, not mid-chat
        runtime.sync_experiment()
        register_providers()
        runtime.connect_proposer_and_alerts()
        return runtime

    def connect_proposer_and_alerts(self) -> None:
        """Build the alert deliverer and the proposer hooks; alert on model restarts.

        The hooks hand the optimizer job a completion function on this process's
        model (:mod:`chatbot.llm.proposer`): with the local model, proposals and
        replays wait until no chat reply is running or queued.
        """
        from chatbot.llm import finetune
        from chatbot.llm.proposer import make_hooks

        config = self.config
        self.finetune_hooks = finetune.make_hooks(config)
        if config.alerts:
            self.alerts = AlertDeliverer(config.alerts, store=self.store)
        if config.proposer.enabled:
            self.proposer_hooks = make_hooks(config, knowledge=self.prompts.knowledge)
        if self.alerts is not None and config.model.name.startswith("local/"):
            from chatbot.llm import local

            alerts, exp = self.alerts, config.experiment.id

            def restarted(pid: int) -> None:
                alerts.emit(
                    Alert(
                        "model_restart",
                        f"Flywheel {exp}: the local model process was restarted (pid {pid}) "
                        "after a crash or hang; the reply in progress failed",
                        exp,
                        None,
                        {"pid": pid, "model": config.model.name},
                    )
                )

            local.model_process().on_restart = restarted

    def sync_experiment(self) -> None:
        """Register the experiment and its arms (with prompt hashes) in the store.

        The configured champion is promoted once, when the experiment has no
        ``promoted`` event yet; later promotions (operator, optimizer) win.
        """
        exp = self.config.experiment
        self.store.sync_experiment(
            exp.id, exp.salt, [arm_spec(a, self.prompts) for a in self.arms.values()]
        )
        if exp.champion is None:
            return
        ev = schema.arm_events
        with self.store.engine.connect() as conn:
            promoted = conn.execute(
                sa.select(ev.c.id).where(ev.c.experiment_id == exp.id, ev.c.kind == "promoted")
            ).first()
        if promoted is None:
            self.store.record_arm_event(
                exp.id,
                exp.champion,
                "promoted",
                actor="config",
                evidence={"source": self.config.source},
            )

    def serve(self, arm_id: str) -> tuple[ArmConfig, Variant]:
        """The arm settings and prompt an assigned arm serves, from the store's arm versions.

        Arms are data: one created at run time (dashboard, CLI, optimizer) is
        served from its stored text without a restart, and every replica
        serves a version's stored text whatever its own ``prompts/`` holds. A
        retired version (superseded by an edit) serves its newest version, so
        its open sessions move to it. Unknown arms fall back to :meth:`arm`.
        Blocking (reads the store every ``arms_refresh_s``): call it off the loop.
        """
        rows = self._stored_arms(arm_id)
        if arm_id in rows:
            newest = successor(list(rows.values()), arm_id)
            return _served(rows[newest], self.prompts)
        arm = self.arm(arm_id)
        return arm, self.prompts.variant(arm.prompt)

    def serve_model(self, arm_id: str) -> tuple[ModelConfig, str | None]:
        """The model an assigned arm's turns use, and where it lives (``api_base``).

        An arm without a model of its own serves ``[model]``; one with a model
        gets ``[model]`` with the arm's name, temperature and max_tokens (timeouts,
        retries and the fallback stay the deployment's). An ``api_base`` that is
        not (or no longer) in ``model.allowed_api_bases`` is refused: the turn
        goes to the configured model instead, with an error logged, never to an
        address the operator did not allow. Blocking, like :meth:`serve`.
        """
        rows = self._stored_arms(arm_id)
        if arm_id in rows:
            row = rows[successor(list(rows.values()), arm_id)]
            name, params = row.model, dict(row.model_params or {})
        else:
            arm = self.arm(arm_id)
            name, params = arm.model, arm.model_params
        try:
            chosen = resolve_model(name, params, self.config.model)
        except ConfigError as exc:
            log.error("arm %r: %s; serving the configured model", arm_id, exc)
            return self.config.model, None
        if chosen.default:
            return self.config.model, None
        model = self.config.model.model_copy(
            update={
                "name": chosen.name,
                "temperature": chosen.temperature,
                "max_tokens": chosen.max_tokens,
            }
        )
        return model, chosen.api_base

    def _stored_arms(self, arm_id: str) -> dict[str, Any]:
        now = time.monotonic()
        with self._stored_lock:
            fresh = now - self._stored_at < self.arms_refresh_s and arm_id in self._stored
            if fresh:
                return self._stored
        rows = {r.id: r for r in self.store.arms(self.config.experiment.id)}
        with self._stored_lock:
            self._stored, self._stored_at = rows, now
        return rows

    def arm(self, arm_id: str) -> ArmConfig:
        """The configuration of an assigned arm.

        An assignment may name an arm removed from the configuration since;
        such sessions keep chatting on the champion's (or the first) arm.
        """
        if arm_id in self.arms:
            return self.arms[arm_id]
        fallback = self.config.experiment.champion or next(iter(self.arms))
        log.warning("arm %r is no longer configured; serving %r", arm_id, fallback)
        return self.arms[fallback]

    async def record_turn(self, turn: TurnRecord) -> bool:
        """Commit a turn (False: its id was stored before); returns once it is committed.

        Turns finishing together share one transaction (:class:`GroupCommitter`).
        """
        if self._turns is None:
            self._turns = GroupCommitter(self.store.record_turns)
        return await self._turns.record(turn)

    async def record_outcome(self, outcome: OutcomeRecord) -> bool:
        """Store an outcome once per idempotency key, then mirror it; False for a duplicate."""
        stored = await asyncio.to_thread(self.store.record_outcome, outcome)
        if stored:
            best_effort(self.tracer.score_outcome, outcome)
        return stored

    async def record_vote(
        self, turn_id: str, user_id: str, value: int | None, comment: str | None = None
    ) -> None:
        """Set (1 up, 0 down) or delete (None) ``user_id``'s vote on a turn of theirs.

        Raises :class:`~optimizer.errors.OwnershipError` when the turn is not
        the user's, ``ValueError`` for a comment over ``limits.max_comment_chars``.
        """
        limit = self.config.limits.max_comment_chars
        if storable_text(turn_id) != turn_id:
            raise ValueError(f"turn id must be plain text, got {turn_id!r}")
        comment = storable_text(comment).strip() if comment else None
        if comment and len(comment) > limit:
            raise ValueError(f"comment must be at most {limit} characters, got {len(comment)}")
        if self._votes is None:  # votes arriving together share one transaction
            self._votes = GroupCommitter(self.store.record_votes)
        await self._votes.record(VoteRecord(turn_id, user_id, value, comment or None, utcnow()))
        best_effort(self.tracer.score_feedback, turn_id, user_id, value, comment or None)

    def close(self) -> None:
        """Flush the tracer (bounded) and release database connections."""
        best_effort(self.tracer.shutdown)
        self.store.dispose()


class GroupCommitter(Generic[T, R]):
    """Group commit: writes that arrive together share one transaction.

    Each chat turn and vote must be committed before it is acknowledged, and a
    commit waits for the disk: one transaction per write made fifty replies
    finishing at once queue for fifty disk flushes (~6 ms each on SQLite with
    ``synchronous=FULL``), the last one ~350 ms late. Here a caller queues its
    item and waits; one task at a time hands everything queued to ``commit``
    (one transaction: :meth:`optimizer.store.Store.record_turns`,
    :meth:`~optimizer.store.Store.record_votes`) and then answers every caller
    with its own result — raised if it is an exception (a refused vote). Alone,
    an item is committed at once, as before.
    """

    def __init__(self, commit: Callable[[list[T]], list[R]], *, max_batch: int = 200) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.commit = commit
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def record(self, item: T) -> R:
        """``item``'s result once its batch is committed; raises the store's error if the
        batch's transaction failed (nothing of it was committed then)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done() or self._task.get_loop().is_closed():
            self._task = asyncio.create_task(self._commit_pending())
        return await future

    async def _commit_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                results = await asyncio.to_thread(self.commit, [item for item, _ in batch])
            except Exception as exc:  # e.g. the database is down: every caller hears of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def storable_text(text: str) -> str:
    """``text`` without what a database cannot store: NUL characters, lone surrogates (→ "?").

    >>> storable_text("a" + chr(0) + "b" + chr(0xD800) + "c")
    'ab?c'
    """
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def best_effort(fn: Any, *args: Any) -> Any:
    """Call a tracer method; tracing must never break a chat (it should not raise anyway)."""
    try:
        return fn(*args)
    except Exception:
        log.exception("tracer call %s failed", getattr(fn, "__name__", fn))
        return None


_runtime: Runtime | None = None


def set_runtime(runtime: Runtime) -> None:
    """Install the process's runtime (``create_app`` does this)."""
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    """The runtime installed by :func:`set_runtime`; raises RuntimeError before that."""
    if _runtime is None:
        raise RuntimeError(
            "no Flywheel runtime installed: build the app with chatbot.web.server.create_app"
        )
    return _runtime
