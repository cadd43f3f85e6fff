"""Load and validate ``flywheel.toml``.

The file is optional: every field has a documented default, so the product runs
on its embedded defaults. Environment variables from :mod:`optimizer.settings`
override the file. Validation errors raise :class:`ConfigError` naming the file
and the dotted field path, e.g.
``flywheel.toml: kpi.terms.0.weight: weight must be finite, got nan``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizer import settings
from optimizer.errors import ConfigError

__all__ = [
    "ActionConfig",
    "AlertConfig",
    "ArmConfig",
    "AuthConfig",
    "Config",
    "ExperimentConfig",
    "FewShotConfig",
    "FineTuneConfig",
    "GuardrailConfig",
    "KPIConfig",
    "KPITermConfig",
    "LangfuseConfig",
    "LimitsConfig",
    "ModelConfig",
    "ModelPriceConfig",
    "PolicyConfig",
    "ProposerConfig",
    "ProposerJudgeConfig",
    "SecurityConfig",
    "UserConfig",
    "load_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelPriceConfig(_Section):
    """What one model costs, in USD per million tokens (litellm does not know local/custom ones)."""

    input_usd_per_mtok: float = Field(0.0, ge=0, allow_inf_nan=False)
    output_usd_per_mtok: float = Field(0.0, ge=0, allow_inf_nan=False)


def _check_api_base(api_base: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", api_base):
        raise ValueError(f"api_base must be an http(s) URL, got {api_base!r}")
    return api_base.rstrip("/")


class ModelConfig(_Section):
    """The LLM. ``name`` is any litellm model string; ``local/…`` runs the packaged GGUF.

    ``prices`` maps a model string to its price per token (local and custom
    models; 0 when absent — litellm's own cost is used for models it knows).
    ``allowed_api_bases`` lists the only ``api_base`` URLs an arm may send
    conversations to (an arm's ``api_base`` is where user text goes: an
    operator's typo or a malicious arm must not exfiltrate it).
    """

    name: str = settings.DEFAULT_MODEL
    fallback: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    stall_s: float = Field(15.0, gt=0)  # longest gap between tokens before a model counts as hung
    retries: int = Field(1, ge=0, le=5)
    max_tokens: int = Field(160, gt=0, le=4096)
    temperature: float = Field(0.7, ge=0, le=2)
    context_tokens: int = Field(2048, ge=256)
    prices: dict[str, ModelPriceConfig] = Field(default_factory=dict)
    allowed_api_bases: tuple[str, ...] = ()

    @field_validator("allowed_api_bases")
    @classmethod
    def _bases(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_api_base(b) for b in v)


class UserConfig(_Section):
    """A login fixed in the file. ``password_hash`` is a bcrypt hash.

    ``flywheel users add`` keeps logins in the database instead (changeable
    without a restart, sessions ended on a password change); use this table
    for logins that must come with the deployment's files.
    """

    name: str = Field(min_length=1)
    password_hash: str = Field(min_length=20)
    role: Literal["user", "operator"] = "user"
    #: What the experiment may segment on (``experiment.segment_by``), e.g. {plan = "pro"}.
    attributes: dict[str, str] = Field(default_factory=dict)


class AuthConfig(_Section):
    """Logins. ``demo = true`` adds demo/demo (user) and operator/operator (operator)."""

    demo: bool = True
    users: tuple[UserConfig, ...] = ()


class SecurityConfig(_Section):
    """What the server trusts once it leaves localhost.

    ``allowed_origins``: other sites whose pages may call this server with the
    user's cookies (CORS with credentials), e.g. ``["https://app.example.com"]``;
    empty means same origin only, and ``"*"`` is refused. ``trusted_proxies``:
    addresses (or CIDR networks) of load balancers whose ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` are believed, so cookies are ``Secure`` behind a proxy
    that ends TLS and throttling counts the real client. Login throttling: after
    ``login_free_failures`` failed logins of an account within
    ``login_window_s`` (``client_free_failures`` from one client address), the
    next attempt must wait ``login_backoff_s`` seconds after the last failure,
    doubling with each further failure up to ``login_max_backoff_s``.
    """

    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    login_free_failures: int = Field(5, ge=1)
    client_free_failures: int = Field(20, ge=1)
    login_backoff_s: float = Field(2.0, gt=0)
    login_max_backoff_s: float = Field(900.0, gt=0)
    login_window_s: float = Field(3600.0, gt=0)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for origin in v:
            if origin.strip() == "*":
                raise ValueError(
                    "allowed_origins must list sites, not '*': a wildcard with credentials "
                    "lets any site act as the logged-in user"
                )
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?", origin):
                raise ValueError(
                    f"allowed_origins entries must look like https://host[:port], got {origin!r}"
                )
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in v:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies entries must be IP addresses or networks, got {proxy!r}"
                ) from None
        return v


class ArmConfig(_Section):
    """One arm: a prompt variant × a few-shot strategy × a model.

    ``fewshot`` is ``none``, ``fixed`` (the ``examples`` ids, in order) or
    ``retrieved`` (``k`` approved bank examples nearest to the user's message).
    ``model`` is any litellm model string with its own ``temperature``,
    ``max_tokens`` and ``api_base`` (None: ``[model]``'s); an arm without a
    model serves the configured one and keeps its identity.
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:+/-]+$")
    prompt: str = Field(min_length=1)
    fewshot: Literal["none", "fixed", "retrieved"] = "none"
    examples: tuple[str, ...] = ()
    k: int = Field(3, ge=1, le=20)
    reward_weighted: bool = False
    model: str | None = Field(None, min_length=1, max_length=200)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0, le=4096)
    api_base: str | None = None

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, v: str | None) -> str | None:
        return None if v is None else _check_api_base(v)

    @model_validator(mode="after")
    def _fixed_needs_examples(self) -> ArmConfig:
        if self.fewshot == "fixed" and not self.examples:
            raise ValueError("fewshot = 'fixed' needs a non-empty 'examples' list")
        if self.model is None and (
            self.temperature is not None or self.max_tokens is not None or self.api_base
        ):
            raise ValueError("temperature, max_tokens and api_base of an arm need its 'model'")
        return self

    @property
    def model_params(self) -> dict[str, object]:
        """The model's own parameters that are set (part of the arm's identity)."""
        params: dict[str, object] = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "api_base": self.api_base,
        }
        return {k: v for k, v in params.items() if v is not None}


class ExperimentConfig(_Section):
    id: str = Field("default", min_length=1)
    #: Mixed into the user hash so two experiments split users independently.
    salt: str = "flywheel"
    champion: str | None = None
    #: Context keys that define segments for per-segment allocation (e.g. ``["plan"]``).
    segment_by: tuple[str, ...] = ()
    arms: tuple[ArmConfig, ...] = ()
    #: Share of users (sticky) kept on ``baseline`` for the experiment's life, outside the
    #: bandit: the flywheel's own lift is measured against them. 0 disables it.
    holdback: float = Field(0.05, ge=0, lt=0.5)
    #: The holdback's arm; default: ``champion``, else the first arm. Never follows promotions.
    baseline: str | None = None

    @property
    def baseline_arm(self) -> str | None:
        """The holdback's arm: ``baseline``, else the configured champion, else the first arm."""
        return self.baseline or self.champion or (self.arms[0].id if self.arms else None)

    @model_validator(mode="after")
    def _arms_consistent(self) -> ExperimentConfig:
        ids = [a.id for a in self.arms]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"arm ids must be unique, got duplicates {dupes}")
        if self.champion is not None and self.arms and self.champion not in ids:
            raise ValueError(f"champion must be one of the arm ids {ids}, got {self.champion!r}")
        if self.baseline is not None and self.arms and self.baseline not in ids:
            raise ValueError(f"baseline must be one of the arm ids {ids}, got {self.baseline!r}")
        return self


class KPITermConfig(_Section):
    """One term of the per-session reward: ``weight × min(value, cap)``.

    ``source`` is ``outcome:<name>`` (an outcome event), one of the feedback
    metrics ``feedback:up_rate``, ``feedback:down_rate``, or ``cost:usd`` (what
    the session's turns cost, summed; give it a negative weight to optimise,
    say, conversions minus spend). ``aggregate`` says how
    several events of the session combine. A term counts only once its
    ``window_days`` after the session start have passed (see ``optimizer.kpi``).
    """

    name: str = Field(min_length=1)
    source: str = Field(
        pattern=r"^(outcome:[A-Za-z0-9_.-]+|feedback:(up_rate|down_rate)|cost:usd)$"
    )
    weight: float
    cap: float | None = None
    window_days: float = Field(7.0, ge=0)
    aggregate: Literal["max", "sum", "last"] = "max"

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"weight must be finite, got {v}")
        return v

    @field_validator("cap")
    @classmethod
    def _positive_cap(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"cap must be a positive finite number, got {v}")
        return v


class GuardrailConfig(_Section):
    """A metric an arm may not worsen beyond a limit relative to the champion.

    ``metric``: ``thumbs_down_rate``, ``error_rate`` (absolute ``max_delta``),
    ``latency_p95_ms`` (``max_ratio`` to the champion's) or ``cost_per_session``
    (mean USD per session; ``max_ratio`` to the champion's forbids, say, a
    variant that doubles the bill, ``max_delta`` is in USD).
    """

    metric: Literal["thumbs_down_rate", "error_rate", "latency_p95_ms", "cost_per_session"]
    max_delta: float | None = Field(None, gt=0)
    max_ratio: float | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _one_limit(self) -> GuardrailConfig:
        if (self.max_delta is None) == (self.max_ratio is None):
            raise ValueError("set exactly one of max_delta or max_ratio")
        return self


def _default_terms() -> tuple[KPITermConfig, ...]:
    return (
        KPITermConfig(name="conversion", source="outcome:conversion", weight=1.0, window_days=7),
        KPITermConfig(name="thumbs_up", source="feedback:up_rate", weight=0.2, window_days=1),
        KPITermConfig(
            name="support_minutes",
            source="outcome:support_minutes",
            weight=-0.02,
            cap=60,
            window_days=1,
            aggregate="sum",
        ),
        KPITermConfig(
            name="revenue", source="outcome:revenue", weight=0.001, window_days=30, aggregate="sum"
        ),
    )


def _default_guardrails() -> tuple[GuardrailConfig, ...]:
    return (
        GuardrailConfig(metric="thumbs_down_rate", max_delta=0.05),
        GuardrailConfig(metric="error_rate", max_delta=0.05),
        GuardrailConfig(metric="latency_p95_ms", max_ratio=1.5),
    )


class KPIConfig(_Section):
    terms: tuple[KPITermConfig, ...] = Field(default_factory=_default_terms, min_length=1)
    guardrails: tuple[GuardrailConfig, ...] = Field(default_factory=_default_guardrails)


class PolicyConfig(_Section):
    """Safe-rollout settings of the Thompson sampling policy (see ``optimizer.policy``)."""

    kind: Literal["thompson", "uniform"] = "thompson"
    burn_in: int = Field(100, ge=0)
    floor: float = Field(0.02, ge=0, lt=1)
    challenger_cap: float = Field(0.2, gt=0, le=1)
    challenger_min_sessions: int = Field(200, ge=0)
    #: Share an arm keeps, without decay, while one of its guardrails is undecided with a
    #: plausible breach (a *suspect*, ``optimizer.guardrails``), and the champion with it:
    #: the evidence a pause needs arrives in bounded time even when Thompson sampling would
    #: starve either arm. 0 disables (the floor then decays as usual).
    guardrail_floor: float = Field(0.1, ge=0, lt=0.5)
    pause_probability: float = Field(0.95, gt=0.5, lt=1)
    stop_probability_best: float = Field(0.95, gt=0.5, lt=1)
    stop_expected_loss: float = Field(0.001, gt=0)
    auto_promote: bool = False
    refit_interval_s: float = Field(300.0, ge=0)
    samples: int = Field(4000, ge=100)
    #: An arm's floor shrinks as floor / (1 + complete_sessions / floor_decay_sessions);
    #: 0 keeps it constant.
    floor_decay_sessions: float = Field(1000.0, ge=0)
    #: "model" (default): open sessions count, term by term, with the estimated share of
    #: their outcome already observed — learning starts on day one; "wait": a session counts
    #: once all KPI windows closed (exact, but a 30-day revenue term means a month of
    #: uniform traffic). See ``optimizer.kpi``.
    delay: Literal["wait", "model"] = "model"
    #: Partial pooling: a segment's prior is its arm's pooled posterior, worth this many
    #: sessions.
    segment_prior_sessions: float = Field(50.0, gt=0)
    #: "always_valid": pause only when an always-valid bound clears the limit (valid however
    #: often the optimizer looks, see ``optimizer.guardrails``); "posterior": the per-look rule.
    guardrail_rule: Literal["always_valid", "posterior"] = "always_valid"
    #: "pause" a breached arm, or only "observe" (record the checks, never pause).
    guardrail_action: Literal["pause", "observe"] = "pause"
    #: "always_valid": the stop rule also needs an always-valid bound of best − every other
    #: arm above 0 (see ``optimizer.policy``); "posterior": P(best) and expected loss only.
    stop_rule: Literal["always_valid", "posterior"] = "always_valid"
    #: With ``auto_promote``, when the stop rule fires: retire every other active arm whose
    #: probability of being best is below this after ``retire_min_sessions`` effective
    #: sessions (0 disables).
    retire_probability_best: float = Field(0.01, ge=0, lt=0.5)
    retire_min_sessions: int = Field(1000, ge=0)


class ActionConfig(_Section):
    """A call-to-action button under replies that records an outcome when clicked."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    label: str = Field(min_length=1)
    outcome: str = Field(min_length=1)
    value: float = 1.0


def _default_actions() -> tuple[ActionConfig, ...]:
    return (ActionConfig(name="start_trial", label="Start free trial", outcome="conversion"),)


class FewShotConfig(_Section):
    min_reward: float = 0.5
    dedup_threshold: float = Field(0.9, gt=0, le=1)
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(1200, gt=0)
    auto_approve: bool = False
    # Mining (optimizer.fewshot.mining): besides a session reward >= min_reward,
    # a thumbs-up on the turn, one of `outcomes` (value > 0) or a `resolved_outcome`
    # with at most `max_support_minutes` of support time makes a turn qualify.
    thumbs_up: bool = True
    outcomes: tuple[str, ...] = ("conversion",)
    resolved_outcome: str = "resolved"
    support_minutes_outcome: str = "support_minutes"
    max_support_minutes: float = Field(10.0, ge=0)
    #: Examples a mining run scrubs and adds at most, best first; the rest wait for the
    #: next run. Bounds the run's time and memory when thousands of turns qualify at once.
    max_mined_per_run: int = Field(50, ge=1)
    # Credit (optimizer.fewshot.credit): demote an example whose sessions are below
    # their arm's average with this posterior probability, once it has enough sessions.
    demote_probability: float = Field(0.9, gt=0.5, lt=1)
    credit_min_sessions: int = Field(20, ge=2)
    # Challenger proposal after this many newly approved examples, with the best k.
    propose_after: int = Field(10, ge=1)
    propose_k: int = Field(3, ge=1, le=20)
    #: Create the proposed arm in the store at once (false: only record the proposal).
    propose_adds_arm: bool = True
    #: Seconds between the chat path's checks for bank changes (0 = every call).
    refresh_s: float = Field(30.0, ge=0)
    #: Preference pairs for exports: minimum TF-IDF cosine between the two prompts.
    pair_similarity: float = Field(0.6, gt=0, le=1)


class LangfuseConfig(_Section):
    #: Scrub PII from inputs and outputs before they are sent to Langfuse.
    mask: bool = True
    flush_timeout_s: float = Field(2.0, gt=0)
    request_timeout_s: float = Field(3.0, gt=0)


class LimitsConfig(_Section):
    """Input limits and rate limits of the public surfaces."""

    max_body_bytes: int = Field(16_384, gt=0)
    max_message_chars: int = Field(4000, gt=0)
    max_comment_chars: int = Field(1000, gt=0)
    outcomes_per_minute_per_key: int = Field(600, gt=0)
    votes_per_minute_per_user: int = Field(60, gt=0)
    #: Past these, a process refuses new work at once (busy message, 503) instead of slowing all.
    max_concurrent_turns: int = Field(100, gt=0)
    max_concurrent_requests: int = Field(200, gt=0)


class FineTuneConfig(_Section):
    """Fine-tuning from the flywheel's own data (``flywheel finetune``, :mod:`optimizer.finetune`).

    A session qualifies for the training set when any KPI term named in
    ``qualify`` is > 0 *and* the windows of those terms have closed (a session
    still inside a window might yet convert, or be thumbed down). Opted-out
    users and deleted conversations never qualify. ``spend_cap_usd`` bounds the
    estimated cost of the jobs started within ``spend_window_days`` (estimate:
    trained tokens × ``epochs`` × ``usd_per_mtok_trained``). Retraining starts
    the next job after ``retrain_interval_days`` or ``retrain_after_sessions``
    new qualifying sessions (0 disables either); the previous fine-tune keeps
    serving until the new one beats it on the KPI.
    """

    provider: Literal["openai", "azure", "vertex_ai"] = "openai"
    base_model: str = Field("gpt-4o-mini-2024-07-18", min_length=1)
    #: Where the provider's API lives (must be in ``model.allowed_api_bases``); None: default.
    api_base: str | None = None
    format: Literal["openai-sft", "dpo"] = "openai-sft"
    #: KPI term names (default: those of the two that the KPI has).
    qualify: tuple[str, ...] = ("conversion", "thumbs_up")
    min_sessions: int = Field(10, ge=1)
    epochs: int = Field(3, ge=1, le=50)
    #: DPO's beta (how far the model may move from the base); None: the provider's default.
    dpo_beta: float | None = Field(None, gt=0, le=2, allow_inf_nan=False)
    usd_per_mtok_trained: float = Field(3.0, ge=0, allow_inf_nan=False)
    spend_cap_usd: float = Field(50.0, ge=0, allow_inf_nan=False)
    spend_window_days: float = Field(30.0, gt=0)
    retrain_interval_days: float = Field(0.0, ge=0)
    retrain_after_sessions: int = Field(0, ge=0)
    poll_interval_s: float = Field(30.0, gt=0)
    #: Where the server's optimizer job keeps the datasets it uploads (relative: to the cwd).
    out_dir: str = Field("exports/finetune", min_length=1)

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, v: str | None) -> str | None:
        return None if v is None else _check_api_base(v)


AlertEvent = Literal[
    "candidate_waiting",
    "guardrail_pause",
    "model_restart",
    "promotion",
    "srm",
    "stop_rule",
]
_ALERT_EVENTS: tuple[AlertEvent, ...] = (
    "candidate_waiting",
    "guardrail_pause",
    "model_restart",
    "promotion",
    "srm",
    "stop_rule",
)


class AlertConfig(_Section):
    """A webhook (``[[alerts]]``) and the events it receives (see ``optimizer.alerts``).

    ``secret_env`` names the environment variable holding the HMAC key (the key
    itself never sits in the file); unset: bodies are not signed.
    """

    url: str = Field(pattern=r"^https?://\S+$")
    events: tuple[AlertEvent, ...] = _ALERT_EVENTS
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(5.0, gt=0, le=60)
    retries: int = Field(3, ge=0, le=10)
    backoff_s: float = Field(1.0, ge=0, le=300)


class ProposerJudgeConfig(_Section):
    """An optional LLM-judge gate: the judge model answers ``question`` about the candidate
    prompt with YES or NO; ``pass_on`` is the answer that lets it through."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    question: str = Field(min_length=5)
    pass_on: Literal["yes", "no"] = "yes"


class ProposerConfig(_Section):
    """Challengers written from the feedback (``optimizer.proposer``).

    A round runs in the optimizer job when the champion has at least
    ``min_new_negative`` thumbs-down turns since the last round, fewer than
    ``max_live`` proposed arms are live, and ``min_interval_hours`` passed.
    ``model`` None: the chat model (``model.name``; the local model by default).
    """

    enabled: bool = True
    model: str | None = None
    auto_start: bool = False
    max_live: int = Field(2, ge=0, le=20)
    min_new_negative: int = Field(20, ge=1)
    min_interval_hours: float = Field(24.0, ge=0)
    candidates: int = Field(3, ge=1, le=10)
    #: Thumbs-down and low-KPI turns shown to the proposer (cut to fit the context budget).
    sample_turns: int = Field(12, ge=1, le=200)
    #: Candidates closer than this (TF-IDF cosine) to an existing arm's prompt are dropped.
    dedup_threshold: float = Field(0.92, gt=0, le=1)
    min_prompt_chars: int = Field(40, ge=1)
    max_prompt_chars: int = Field(4000, gt=0)
    max_tokens: int = Field(400, gt=0, le=8192)
    temperature: float = Field(0.9, ge=0, le=2)
    #: A whole rewrite may take this long (a local model writes a few tokens a second).
    timeout_s: float = Field(300.0, gt=0)
    #: Prompt budget of the proposer model (None: ``model.context_tokens``).
    context_tokens: int | None = Field(None, ge=256)
    #: Held-out past user questions each candidate must answer before any traffic.
    replay_questions: int = Field(6, ge=1, le=100)
    #: A started proposal's trial (optimizer.proposer.trials): at most ``trial_cap`` of the
    #: traffic until ``trial_sessions`` effective sessions; then the cap is lifted if
    #: P(KPI above the champion's) >= ``keep_probability``, else it is retired. 1 = no trial.
    trial_cap: float = Field(0.1, gt=0, le=1)
    trial_sessions: int = Field(2000, ge=1)
    keep_probability: float = Field(0.8, gt=0, lt=1)
    #: Spending cap of a paid proposer and its judges, per UTC day (litellm's cost).
    max_cost_usd_per_day: float = Field(1.0, ge=0)
    judges: tuple[ProposerJudgeConfig, ...] = ()


class Config(_Section):
    """The whole configuration. ``source`` is the file it came from (for messages)."""

    database_url: str = ""
    prompts_dir: str = "prompts"
    model: ModelConfig = ModelConfig()
    auth: AuthConfig = AuthConfig()
    experiment: ExperimentConfig = ExperimentConfig()
    kpi: KPIConfig = KPIConfig()
    policy: PolicyConfig = PolicyConfig()
    actions: tuple[ActionConfig, ...] = Field(default_factory=_default_actions)
    resolved_label: str = "My issue is solved"
    fewshot: FewShotConfig = FewShotConfig()
    langfuse: LangfuseConfig = LangfuseConfig()
    limits: LimitsConfig = LimitsConfig()
    security: SecurityConfig = SecurityConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    proposer: ProposerConfig = ProposerConfig()
    alerts: tuple[AlertConfig, ...] = ()
    source: str = "<defaults>"

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        allowed = set(self.model.allowed_api_bases)
        for i, arm in enumerate(self.experiment.arms):
            if arm.api_base is not None and arm.api_base not in allowed:
                raise ValueError(
                    f"experiment.arms.{i}.api_base {arm.api_base!r} is not in "
                    f"model.allowed_api_bases {sorted(allowed)}"
                )
        base = self.finetune.api_base
        if base is not None and base not in allowed:
            raise ValueError(
                f"finetune.api_base {base!r} is not in model.allowed_api_bases {sorted(allowed)}"
            )
        names = {t.name for t in self.kpi.terms}
        unknown = [q for q in self.finetune.qualify if q not in names]
        # the default names terms a custom KPI may not have: only an explicit list must match
        if unknown and "qualify" in self.finetune.model_fields_set:
            raise ValueError(
                f"finetune.qualify names KPI terms {sorted(names)}, got unknown {unknown}"
            )
        return self


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(
            f"{where}: {msg} (got {err.get('input')!r})"
            if err["type"] != "value_error"
            else f"{where}: {msg}"
        )
    return f"{source}: " + "; ".join(parts)


def load_config(path: str | Path | None = None, *, environ: bool = True) -> Config:
    """Read ``flywheel.toml`` (or ``path``), apply environment overrides, validate.

    A missing file gives the defaults. Raises :class:`ConfigError` naming the
    file and the field for anything invalid.

    >>> load_config("/nonexistent.toml", environ=False).policy.burn_in
    100
    """
    if path is None:
        path = settings.env(settings.FLYWHEEL_CONFIG, "flywheel.toml") or "flywheel.toml"
    path = Path(path)
    data: dict[str, object] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if environ:
        _apply_environment(data)
    data["source"] = str(path)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(str(path), exc)) from None
    if not config.database_url:
        config = config.model_copy(update={"database_url": settings.default_database_url()})
    return config


def _apply_environment(data: dict[str, object]) -> None:
    def section(name: str) -> dict[str, object]:
        value = data.setdefault(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        return value

    if url := settings.env(settings.FLYWHEEL_DATABASE_URL):
        data["database_url"] = url
    if model := settings.env(settings.FLYWHEEL_MODEL):
        section("model")["name"] = model
    if fallback := settings.env(settings.FLYWHEEL_FALLBACK_MODEL):
        section("model")["fallback"] = fallback
    if prompts := settings.env(settings.FLYWHEEL_PROMPTS_DIR):
        data["prompts_dir"] = prompts
    if (demo := settings.env(settings.FLYWHEEL_DEMO)) is not None:
        section("auth")["demo"] = demo.strip().lower() in {"1", "true", "yes", "on"}
    if (origins := settings.env(settings.FLYWHEEL_ALLOWED_ORIGINS)) is not None:
        section("security")["allowed_origins"] = [
            o.strip() for o in origins.split(",") if o.strip()
        ]
    if (proxies := settings.env(settings.FLYWHEEL_TRUSTED_PROXIES)) is not None:
        section("security")["trusted_proxies"] = [
            p.strip() for p in proxies.split(",") if p.strip()
        ]
    if (interval := settings.env(settings.FLYWHEEL_OPTIMIZE_INTERVAL)) is not None:
        try:
            section("policy")["refit_interval_s"] = float(interval)
        except ValueError:
            raise ConfigError(
                f"{settings.FLYWHEEL_OPTIMIZE_INTERVAL} must be a number of seconds, "
                f"got {interval!r}"
            ) from None
