"""Tables of the event store.

Assignments, turns, feedback events, outcomes, arm events, audit events and
example events are append-only: every statistic is derived from them. A few
tables and columns hold current state that is cheap to rebuild from the events
(``feedback`` = latest vote per user and turn, ``examples`` = the bank, the
count columns of ``assignments``), kept in the same transaction as the event
that changes them.

Chainlit's own tables (``users``, ``threads``, ``steps``, ``elements``,
``feedbacks``) live in the same database so people get their thread history;
their quoted camelCase columns are Chainlit's, not ours.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: Statuses an arm can be in; the latest arm event decides.
ARM_STATUS_BY_EVENT = {
    "created": "active",
    "resumed": "active",
    "paused_guardrail": "paused_guardrail",
    "paused_operator": "paused_operator",
    "promoted": "champion",
    "retired": "retired",
}
ACTIVE_STATUSES = frozenset({"active", "champion"})

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_TS = sa.DateTime(timezone=True)
#: Per-session counts kept on ``assignments``: turns, failed turns, rated turns, ups, downs.
SESSION_COUNTS = ("turns", "errors", "rated", "thumbs_up", "thumbs_down")
#: Sums per bucket of ``report_buckets`` (``users``: sessions that were their user's first).
REPORT_FIGURES = (
    "sessions",
    "complete",
    "reward",
    "conversion_known",
    "conversions",
    "turns",
    "errors",
    "rated",
    "thumbs_up",
    "thumbs_down",
    "cost",
    "users",
)
# JSON on both SQLite and PostgreSQL (JSONB there, for indexing later).
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("salt", sa.String(100), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

arms = sa.Table(
    "arms",
    metadata,
    sa.Column("experiment_id", sa.String(100), sa.ForeignKey("experiments.id"), primary_key=True),
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("prompt_id", sa.String(100), nullable=False),
    sa.Column("prompt_hash", sa.String(64), nullable=False),
    sa.Column("fewshot", sa.String(20), nullable=False),  # none | fixed | retrieved
    sa.Column("fewshot_config", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    # Versions (migration 0003): an arm row is one version of a logical arm (`base_id`).
    # Version 1 keeps the base id as its id, so arms and their data never split; a
    # changed content (`content_hash` of prompt text, few-shot strategy and, when set,
    # model) is a new row `<base>@v<n>`. `prompt_text` is what every replica serves.
    sa.Column("base_id", sa.String(200), nullable=True),  # None: the id (rows from before 0003)
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("content_hash", sa.String(64), nullable=True),
    sa.Column("prompt_text", sa.Text, nullable=True),
    sa.Column("model", sa.String(200), nullable=True),  # None: the configured model
    sa.Column("origin", sa.String(20), nullable=False, server_default="config"),
    # The model's own parameters (migration 0006): temperature, max_tokens, api_base; None
    # or {} = the configured ones. Part of the content hash only when non-empty.
    sa.Column("model_params", _JSON, nullable=True),
    # What made the arm, for people (migration 0006): a fine-tune's dataset manifest.
    sa.Column("manifest", _JSON, nullable=True),
)

# Status changes of arms: paused_guardrail, paused_operator, resumed, promoted,
# retired, cap_set, stop_recommended, created. Current status = latest event.
arm_events = sa.Table(
    "arm_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("arm_id", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),  # "optimizer" or an operator name
    sa.Column("evidence", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_arm_events_exp_arm", "experiment_id", "arm_id", "id"),
)

policy_snapshots = sa.Table(
    "policy_snapshots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("policy", sa.String(40), nullable=False),
    # {"segments": {"*": {"arm": p, ...}, "plan=pro": {...}}, ...}
    sa.Column("allocation", _JSON, nullable=False),
    # posterior summaries, guardrail checks, stop rule, SRM, per arm
    sa.Column("summary", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.UniqueConstraint("experiment_id", "version", name="uq_policy_snapshots_exp_version"),
)

assignments = sa.Table(
    "assignments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(100), nullable=False, unique=True),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("arm_id", sa.String(200), nullable=False),
    sa.Column("propensity", sa.Float, nullable=False),
    sa.Column("snapshot_version", sa.Integer, nullable=True),  # None = uniform before any snapshot
    sa.Column("segment", sa.String(200), nullable=False),
    sa.Column("context", _JSON, nullable=False),
    sa.Column("simulated", sa.Boolean, nullable=False, default=False),
    sa.Column("assigned_at", _TS, nullable=False),
    # True: a returning user kept their previous arm with probability 1 (propensity 1.0);
    # False: the arm was drawn with probability `propensity`; NULL: logged before
    # migration 0003 (propensity was the arm's share even for a kept arm; readers derive
    # the flag from context.returning, see optimizer.ope.logs).
    sa.Column("sticky", sa.Boolean, nullable=True),
    # A conversation whose arm stopped serving (paused, retired) moves to the champion at
    # its next message: this assignment is closed (closed_at, closed_reason) and a new one,
    # with session id "<thread>~<n>", continues the same thread_id (NULL: the thread is
    # the session itself).
    sa.Column("thread_id", sa.String(100), nullable=True),
    sa.Column("closed_at", _TS, nullable=True),
    sa.Column("closed_reason", sa.String(200), nullable=True),
    # The session's turn and vote counts, kept by the store in the transaction that
    # writes the turn or vote (Store.refresh_session_counts): a refit reads one row
    # per session instead of counting millions of turns (optimizer.kpi).
    *(sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in SESSION_COUNTS),
    # In the holdback (migration 0003): the experiment's baseline arm, outside the bandit.
    sa.Column("holdback", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_assignments_user", "user_id", "experiment_id", "id"),
    sa.Index("ix_assignments_exp_time", "experiment_id", "assigned_at"),
    sa.Index("ix_assignments_thread", "thread_id"),
    # Holdback sessions only (migration 0011), a few percent of the rows: which arms have
    # any (the latency guardrail's window skips the holdback check on the others), and
    # whether a session is one (an index-only probe, optimizer.latencies).
    sa.Index(
        "ix_assignments_holdback_arm",
        "experiment_id",
        "arm_id",
        postgresql_where=sa.text("holdback"),
        sqlite_where=sa.text("holdback = 1"),
    ),
    sa.Index(
        "ix_assignments_holdback",
        "session_id",
        postgresql_where=sa.text("holdback"),
        sqlite_where=sa.text("holdback = 1"),
    ),
)

turns = sa.Table(
    "turns",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),  # Chainlit run step id
    sa.Column("session_id", sa.String(100), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("arm_id", sa.String(200), nullable=False),
    sa.Column("prompt_id", sa.String(100), nullable=False),
    sa.Column("prompt_hash", sa.String(64), nullable=False),
    sa.Column("fewshot_ids", _JSON, nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("user_message", sa.Text, nullable=False),
    sa.Column("reply", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=True),
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=True),
    sa.Column("completion_tokens", sa.Integer, nullable=True),
    sa.Column("cost", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("trace_id", sa.String(64), nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    # The arm's model failed and the configured fallback answered (migration 0006): the turn
    # stays the arm's (sticky assignment, propensities), ``model`` says who answered.
    sa.Column("fallback", sa.Boolean, nullable=True),
    sa.Index("ix_turns_session", "session_id", "created_at"),
    # An arm's newest turns are a backward walk of this index, latency and session read from
    # it, not from the table (migration 0011; was (experiment, arm)): optimizer.latencies.
    sa.Index(
        "ix_turns_arm_time", "experiment_id", "arm_id", "created_at", "latency_ms", "session_id"
    ),
    sa.Index("ix_turns_created", "created_at"),  # "anything after now?" in optimizer.kpi
)

# Every vote change is an event; `feedback` holds the current vote per (turn, user).
feedback_events = sa.Table(
    "feedback_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("turn_id", sa.String(100), nullable=False),
    sa.Column("session_id", sa.String(100), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(10), nullable=False),  # upsert | delete
    sa.Column("value", sa.Integer, nullable=True),  # 1 up, 0 down, None on delete
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_feedback_events_turn", "turn_id", "user_id", "id"),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("turn_id", sa.String(100), primary_key=True),
    sa.Column("user_id", sa.String(200), primary_key=True),
    sa.Column("session_id", sa.String(100), nullable=False),
    sa.Column("value", sa.Integer, nullable=True),  # None = vote deleted
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Index("ix_feedback_session", "session_id"),
    sa.Index("ix_feedback_updated", "updated_at"),  # "anything after now?" in optimizer.kpi
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(200), nullable=False, unique=True),
    sa.Column("session_id", sa.String(100), nullable=True),
    sa.Column("user_id", sa.String(200), nullable=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("occurred_at", _TS, nullable=False),
    sa.Column("received_at", _TS, nullable=False),
    # chat | api | langfuse | import | simulator
    sa.Column("source", sa.String(100), nullable=False),
    sa.Column("extra", _JSON, nullable=False),
    # The verdict when it was received (optimizer.attribution): "attributed" or why not
    # (unknown_session, unused_name, ...); NULL: received before migration 0003. The KPI
    # attributes at read time, so an outcome that could not count then counts once it can.
    sa.Column("attribution", sa.String(40), nullable=True),
    sa.Column("attributed_session_id", sa.String(100), nullable=True),
    sa.Index("ix_outcomes_session", "session_id"),
    sa.Index("ix_outcomes_user", "user_id"),
    sa.Index("ix_outcomes_name_time", "name", "occurred_at"),
)

# Few-shot example bank (current state) and its append-only history.
examples = sa.Table(
    "examples",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    # candidate | approved | rejected | pinned | demoted
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("user_text", sa.Text, nullable=False),
    sa.Column("assistant_text", sa.Text, nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # seed | mined
    sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("session_id", sa.String(100), nullable=True),
    sa.Column("turn_id", sa.String(100), nullable=True),
    sa.Column("reward", sa.Float, nullable=True),
    sa.Column("provenance", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
)

example_events = sa.Table(
    "example_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("example_id", sa.String(100), nullable=False),
    # added | approved | rejected | pinned | demoted
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("details", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(60), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("details", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

# Users who opted out of having their conversations used as data (training sets, few-shot
# mining): one row per change, the latest decides (migration 0006).
privacy_opt_outs = sa.Table(
    "privacy_opt_outs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("opted_out", sa.Boolean, nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_privacy_opt_outs_user", "user_id", "id"),
)

# Fine-tuning jobs (optimizer.finetune): one row per job, its state updated as it is polled.
finetune_jobs = sa.Table(
    "finetune_jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("format", sa.String(20), nullable=False),
    sa.Column("base_model", sa.String(200), nullable=False),
    # created | running | succeeded | failed | cancelled
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("provider_file_id", sa.String(200), nullable=True),
    sa.Column("provider_job_id", sa.String(200), nullable=True),
    sa.Column("fine_tuned_model", sa.String(200), nullable=True),
    sa.Column("arm_id", sa.String(200), nullable=True),
    sa.Column("parent_arm_id", sa.String(200), nullable=True),
    sa.Column("estimated_cost_usd", sa.Float, nullable=False),
    # the provider's billable tokens once the job finished, and their price (0008_models2)
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("actual_cost_usd", sa.Float, nullable=True),
    sa.Column("manifest", _JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Index("ix_finetune_jobs_exp", "experiment_id", "created_at"),
)

# Named locks for SQLite (PostgreSQL uses advisory locks): one optimizer run at a time.
# -- the few-shot step's incremental state (optimizer.fewshot.state), rebuilt from the events --
fewshot_state = sa.Table(
    "fewshot_state",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),  # KPI and mining settings
    sa.Column("now_at", _TS, nullable=False),  # the ``now`` of the last run
    sa.Column("marks", _JSON, nullable=False),  # newest event id per table at the last run
    sa.Column("excluded", _JSON, nullable=False),  # sessions that must not become data
    sa.Column("updated_at", _TS, nullable=False),
)

fewshot_sessions = sa.Table(
    "fewshot_sessions",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("session_id", sa.String(100), primary_key=True),
    sa.Column("arm_id", sa.String(200), nullable=False),
    sa.Column("turns", sa.Integer, nullable=False),  # turns mining considered (0: excluded)
    sa.Column("reward", sa.Float, nullable=True),  # complete sessions only
    sa.Column("examples", _JSON, nullable=False),  # example ids its turns showed
    # What the session adds to the report's buckets (None: no assignment up to now).
    sa.Column("figures", _JSON, nullable=True),
)

fewshot_turns = sa.Table(
    "fewshot_turns",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("turn_id", sa.String(100), primary_key=True),
    sa.Column("session_id", sa.String(100), nullable=False),
    sa.Column("arm_id", sa.String(200), nullable=False),
    sa.Column("prompt_id", sa.String(100), nullable=False),
    sa.Column("reasons", sa.String(400), nullable=False),  # comma-separated
    sa.Column("reward", sa.Float, nullable=True),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("reward_so_far", sa.Float, nullable=False),
    sa.Column("rank_reward", sa.Float, nullable=False),  # reward, or the lowest float
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("shortest", sa.Integer, nullable=False),
    sa.Column("longest", sa.Integer, nullable=False),
    sa.Column("mined", sa.Boolean, nullable=False),
    sa.Index("ix_fewshot_turns_session", "experiment_id", "session_id"),
    sa.Index(
        "ix_fewshot_turns_rank",
        "experiment_id",
        "rank_reward",
        "reward_so_far",
        "created_at",
        "turn_id",
    ),
)

fewshot_credit = sa.Table(
    "fewshot_credit",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("example_id", sa.String(100), primary_key=True),  # "" = the arm's total
    sa.Column("arm_id", sa.String(200), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("s", sa.Float, nullable=False),  # sum of complete sessions' rewards
    sa.Column("q", sa.Float, nullable=False),  # sum of their squares
)

report_buckets = sa.Table(
    "report_buckets",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("kind", sa.String(1), primary_key=True),  # "d" day, "h" hour of assignment
    sa.Column("bucket", sa.String(13), primary_key=True),  # "2026-01-05" or "2026-01-05T09"
    sa.Column("arm_id", sa.String(200), primary_key=True),
    sa.Column("segment", sa.String(200), primary_key=True),
    *(sa.Column(name, sa.Float, nullable=False) for name in REPORT_FIGURES),
)

report_support = sa.Table(
    "report_support",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("arm_id", sa.String(200), primary_key=True),
    sa.Column("bin", sa.Integer, primary_key=True),  # log-spaced, see optimizer.report_state
    sa.Column("n", sa.Integer, nullable=False),
)

job_locks = sa.Table(
    "job_locks",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", _TS, nullable=False),
)

# Chat history for Chainlit's data layer (chatbot.web.datalayer). Key columns for
# queries and ownership checks; the rest of Chainlit's dicts kept as JSON so a
# Chainlit upgrade that adds fields needs no migration.
chat_users = sa.Table(
    "chat_users",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("identifier", sa.String(200), nullable=False, unique=True),
    sa.Column("metadata", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

threads = sa.Table(
    "threads",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("user_identifier", sa.String(200), nullable=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("tags", _JSON, nullable=True),
    sa.Column("metadata", _JSON, nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("deleted_at", _TS, nullable=True),
    sa.Index("ix_threads_user", "user_identifier", "created_at"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("thread_id", sa.String(100), nullable=False),
    sa.Column("parent_id", sa.String(100), nullable=True),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("data", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_steps_thread", "thread_id", "created_at"),
)

elements = sa.Table(
    "elements",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("thread_id", sa.String(100), nullable=True),
    sa.Column("data", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

# Logins managed with `flywheel users` (chatbot.web.auth reads them on every login). A removed
# user keeps a row with ``removed_at`` so sessions issued before are recognised and refused.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("password_hash", sa.String(100), nullable=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("attributes", _JSON, nullable=False),
    # Sessions issued before this instant are refused (a password change, a removal).
    sa.Column("sessions_valid_after", _TS, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("removed_at", _TS, nullable=True),
)

# Named outcome-API keys (`flywheel keys`): only a SHA-256 of the key is kept.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("revoked_at", _TS, nullable=True),
    sa.Column("last_used_at", _TS, nullable=True),
)

# Failed (and successful) logins, per account and per client address, shared by replicas.
login_attempts = sa.Table(
    "login_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(10), nullable=False),  # "account" or "client"
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("succeeded", sa.Boolean, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_login_attempts_subject", "scope", "subject", "created_at"),
)

# Challengers written from the feedback (optimizer.proposer): one row per proposal round
# and one per candidate, kept whatever became of it (failed gates with their reason,
# waiting for approval, started as an arm, declined by an operator).
proposal_rounds = sa.Table(
    "proposal_rounds",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("parent_arm_id", sa.String(200), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # proposer, fewshot, operator
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("details", _JSON, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index("ix_proposal_rounds_exp", "experiment_id", "created_at"),
)

proposal_candidates = sa.Table(
    "proposal_candidates",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("round_id", sa.String(40), nullable=False),
    sa.Column("experiment_id", sa.String(100), nullable=False),
    sa.Column("parent_arm_id", sa.String(200), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),
    sa.Column("prompt_text", sa.Text, nullable=True),
    sa.Column("fewshot", sa.String(20), nullable=False),
    sa.Column("fewshot_config", _JSON, nullable=False),
    sa.Column("rationale", sa.Text, nullable=False),
    # rejected (a gate failed), duplicate, waiting (for approval), started, declined
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("gates", _JSON, nullable=False),
    sa.Column("arm_id", sa.String(200), nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("decided_at", _TS, nullable=True),
    sa.Column("decided_by", sa.String(100), nullable=True),
    sa.Index("ix_proposal_candidates_exp", "experiment_id", "status"),
)

# The incremental refit's kept sums (optimizer.refit_state): per experiment, one row per
# part (moments, sketch, srm, delay, as compressed numpy archives) and their watermarks.
# A cache of what the events say: dropping it costs one full recomputation, nothing else.
refit_state = sa.Table(
    "refit_state",
    metadata,
    sa.Column("experiment_id", sa.String(100), primary_key=True),
    sa.Column("part", sa.String(40), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("meta", _JSON, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
)
