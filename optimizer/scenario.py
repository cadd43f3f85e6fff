"""Simulation scenarios: what is true about each arm, read from a TOML file.

A scenario says how many sessions arrive, how fast, how often the optimizer
re-fits, which KPI it optimises, and — per arm, optionally per segment — the
true probabilities and means of every outcome the simulator draws::

    name = "two_close_arms"
    sessions = 20000
    sessions_per_day = 2000
    refit_every_hours = 12

    [delay]                      # conversion delay, truncated to the attribution window
    distribution = "exponential"
    mean_days = 1.5

    [[arms]]
    id = "a"
    conversion = 0.030           # P(conversion within the window)
    rate = 0.3                   # P(the user rates a reply)
    thumbs_up = 0.75             # P(up | rated); P(down | rated) = 1 - thumbs_up

    [[segments]]                 # optional; shares sum to 1
    value = "pro"                # context value of ``segment_by``
    share = 0.3
    arms.a = { conversion = 0.05 }   # overrides of the arm's truth in this segment

The ``[kpi]`` and ``[policy]`` tables take the same fields as ``flywheel.toml``.
``config = "../../flywheel.toml"`` (relative to the scenario file) takes the KPI,
the policy and the holdback share from that configuration file instead — the
shipped defaults — with the scenario's own ``[policy]`` fields (and ``holdback``)
applied on top.

Arms may arrive and leave mid-run: ``arrives_day`` (the arm is created then and
gets traffic from then on) and ``retires_day`` (an operator retires it then; its
returning users move on). Regret at a time counts only the arms present then.

A ``[proposer]`` table closes the loop (:class:`ProposerSpec`): from one
champion the simulated proposer writes challengers every few days (under the
real budget: ``max_live``, ``min_new_negative``, the interval), each with a hidden
truth relative to its parent — conversion lift ~ Normal(``lift_mean``,
``lift_sd``), a ``harmful_share`` drawn from a worse distribution, some of those
broken enough that the replay gate may catch them — and the optimizer starts,
promotes and retires them with no human step.

Errors raise :class:`~optimizer.errors.ConfigError` naming the file and field.

The expected KPI of an arm (:meth:`Scenario.expected_rewards`) is computed in
closed form from the truth and the KPI terms, with the same definitions the
optimizer uses (:mod:`optimizer.kpi`): it is what regret is measured against.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy.special import ndtr, ndtri

from optimizer.assignment import ALL_SEGMENTS
from optimizer.config import KPIConfig, KPITermConfig, PolicyConfig
from optimizer.errors import ConfigError

__all__ = [
    "ArmTruth",
    "DelaySpec",
    "ProposerSpec",
    "Scenario",
    "SegmentSpec",
    "load_scenario",
    "parse_scenario",
]

#: KPI sources the simulator knows how to generate.
SUPPORTED_SOURCES = (
    "outcome:conversion",
    "outcome:revenue",
    "outcome:support_minutes",
    "feedback:up_rate",
    "feedback:down_rate",
    "cost:usd",
)
#: Seconds between a session's start and its earliest conversion.
CONVERSION_OFFSET_S = 60.0
#: Support minutes are reported this long after the session starts.
SUPPORT_OFFSET_S = 3600.0
#: z of the 95th percentile, for lognormal latency p95.
_Z95 = 1.6448536269514722


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Truth(_Strict):
    conversion: float = Field(0.0, ge=0, le=1)
    rate: float = Field(0.3, ge=0, le=1)
    thumbs_up: float = Field(0.7, ge=0, le=1)
    support_minutes: float = Field(0.0, ge=0)
    revenue: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    latency_ms: float = Field(800.0, gt=0)
    latency_sigma: float = Field(0.3, ge=0, le=3)
    cost_per_turn: float = Field(0.0, ge=0)


class ArmTruth(_Truth):
    """What is true about one arm (in one segment).

    ``conversion`` is the probability of a conversion within the attribution
    window; ``rate`` the probability a user rates a reply, ``thumbs_up`` the
    probability it is a thumbs up given a rating; ``support_minutes`` the mean
    of an exponential per session (0: none reported); ``revenue`` the mean of an
    exponential amount per conversion; ``error_rate`` the share of failed
    replies; latency is lognormal with median ``latency_ms`` and log-spread
    ``latency_sigma``; ``cost_per_turn`` is what one reply costs in USD (the
    model's price; a ``cost:usd`` KPI term and the ``cost_per_session``
    guardrail see it as ``turns.cost``).
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:+/-]+$")
    #: Day of the run the arm is created (0: from the start).
    arrives_day: float = Field(0.0, ge=0)
    #: Day of the run an operator retires it (None: never).
    retires_day: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _lifetime(self) -> ArmTruth:
        if self.retires_day is not None and self.retires_day <= self.arrives_day:
            raise ValueError(
                f"arm {self.id!r}: retires_day must be after arrives_day "
                f"({self.arrives_day:g}), got {self.retires_day:g}"
            )
        return self

    @property
    def thumbs_down(self) -> float:
        return 1.0 - self.thumbs_up

    @property
    def latency_p95_ms(self) -> float:
        return self.latency_ms * math.exp(_Z95 * self.latency_sigma)


class ArmOverride(_Truth):
    """Fields of :class:`ArmTruth` that differ in a segment (unset fields are inherited)."""


class SegmentSpec(_Strict):
    value: str = Field(min_length=1)
    share: float = Field(gt=0, le=1)
    arms: dict[str, ArmOverride] = Field(default_factory=dict)


class DelaySpec(_Strict):
    """Conversion delay after the session, truncated to ``max_days`` (default: the window).

    ``exponential`` uses ``mean_days``; ``lognormal`` uses ``median_days`` and
    ``sigma``; ``none`` converts during the session.
    """

    distribution: Literal["none", "exponential", "lognormal"] = "exponential"
    mean_days: float | None = Field(None, gt=0)
    median_days: float | None = Field(None, gt=0)
    sigma: float = Field(1.0, gt=0, le=5)
    max_days: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _parameters(self) -> DelaySpec:
        if self.distribution == "exponential" and self.mean_days is None:
            raise ValueError("an exponential delay needs mean_days")
        if self.distribution == "lognormal" and self.median_days is None:
            raise ValueError("a lognormal delay needs median_days (and sigma)")
        return self

    def cdf(self, days: float) -> float:
        """P(untruncated delay ≤ ``days``)."""
        if days <= 0:
            return 0.0
        if self.distribution == "none":
            return 1.0
        if self.distribution == "exponential":
            assert self.mean_days is not None
            return 1.0 - math.exp(-days / self.mean_days)
        assert self.median_days is not None
        return float(ndtr((math.log(days) - math.log(self.median_days)) / self.sigma))

    def sample(self, u: np.ndarray, max_days: float) -> np.ndarray:
        """Delays in days for uniforms ``u``, by inversion of the CDF truncated to ``max_days``."""
        if self.distribution == "none":
            return np.zeros_like(u)
        v = u * self.cdf(max_days)
        if self.distribution == "exponential":
            assert self.mean_days is not None
            return -self.mean_days * np.log1p(-v)
        assert self.median_days is not None
        return np.exp(math.log(self.median_days) + self.sigma * ndtri(np.clip(v, 1e-300, None)))


class ProposerSpec(_Strict):
    """The simulated proposer: how often it proposes, under which budget, and the hidden
    truth of what it writes, relative to the parent (the champion when it proposes).

    An ordinary proposal's conversion is the parent's × (1 + lift), lift ~
    Normal(``lift_mean``, ``lift_sd``); with probability ``harmful_share`` the lift is
    drawn from Normal(``harmful_lift_mean``, ``harmful_lift_sd``) instead and its
    thumbs-up rate drops by ``harmful_thumbs_drop``; a share ``broken_share`` of the
    harmful ones also fail ``broken_error_rate`` of replies, which the replay gate
    sees on its ``replay_questions`` (and the error-rate guardrail later).
    """

    every_days: float = Field(3.0, gt=0)
    candidates: int = Field(2, ge=1, le=10)
    max_live: int = Field(2, ge=1, le=20)
    min_new_negative: int = Field(20, ge=1)
    auto_start: bool = True
    replay_questions: int = Field(6, ge=1, le=100)
    #: The trial of a started proposal (``proposer.trial_*`` in flywheel.toml).
    trial_cap: float = Field(0.1, gt=0, le=1)
    trial_sessions: int = Field(2000, ge=1)
    keep_probability: float = Field(0.8, gt=0, lt=1)
    lift_mean: float = Field(0.0, gt=-1, lt=5)
    lift_sd: float = Field(0.12, ge=0, lt=5)
    harmful_share: float = Field(0.25, ge=0, le=1)
    harmful_lift_mean: float = Field(-0.3, gt=-1, lt=0)
    harmful_lift_sd: float = Field(0.1, ge=0, lt=5)
    harmful_thumbs_drop: float = Field(0.1, ge=0, le=1)
    broken_share: float = Field(0.5, ge=0, le=1)
    broken_error_rate: float = Field(0.3, ge=0, le=1)


def _default_kpi() -> KPIConfig:
    """Conversion only (7-day window), with the thumbs-down guardrail."""
    return KPIConfig.model_validate(
        {
            "terms": [{"name": "conversion", "source": "outcome:conversion", "weight": 1.0}],
            "guardrails": [{"metric": "thumbs_down_rate", "max_delta": 0.05}],
        }
    )


class Scenario(_Strict):
    """A validated scenario (see the module docstring for the file format)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    sessions: int = Field(gt=0, le=10_000_000)
    sessions_per_day: float = Field(gt=0)
    refit_every_hours: float = Field(gt=0)
    start: datetime = datetime(2025, 1, 6, tzinfo=UTC)
    #: Share of sessions from a user seen before (their arm is sticky).
    returning_share: float = Field(0.0, ge=0, lt=1)
    #: Mean turns per session (1 + Poisson(turns_mean - 1)).
    turns_mean: float = Field(2.0, ge=1, le=50)
    champion: str | None = None
    #: Share of users kept on the champion outside the bandit (``experiment.holdback``).
    holdback: float = Field(0.0, ge=0, lt=0.5)
    segment_by: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$")
    delay: DelaySpec = Field(default_factory=lambda: DelaySpec.model_validate({"mean_days": 1.0}))
    kpi: KPIConfig = Field(default_factory=_default_kpi)
    policy: PolicyConfig = Field(default_factory=lambda: PolicyConfig.model_validate({}))
    arms: tuple[ArmTruth, ...] = Field(min_length=1)
    segments: tuple[SegmentSpec, ...] = ()
    #: The closed loop: challengers written by a simulated proposer (None: no proposals).
    proposer: ProposerSpec | None = None
    source: str = "<scenario>"

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ids = [a.id for a in self.arms]
        if len(ids) < 2 and self.proposer is None:
            raise ValueError("arms: at least 2 arms, or 1 with a [proposer] table")
        if len(set(ids)) != len(ids):
            raise ValueError(f"arm ids must be unique, got {ids}")
        if self.champion is not None and self.champion not in ids:
            raise ValueError(f"champion must be one of the arm ids {ids}, got {self.champion!r}")
        champion = next(a for a in self.arms if a.id == self.champion_id)
        if champion.arrives_day > 0 or champion.retires_day is not None:
            raise ValueError(
                f"the champion {champion.id!r} must be there from day 0 to the end "
                "(no arrives_day or retires_day)"
            )
        for i, term in enumerate(self.kpi.terms):
            if term.source not in SUPPORTED_SOURCES:
                raise ValueError(
                    f"kpi.terms.{i}.source: the simulator generates {list(SUPPORTED_SOURCES)}, "
                    f"got {term.source!r}"
                )
        if self.segments:
            if self.segment_by is None:
                raise ValueError("segments need segment_by (the context key they differ in)")
            values = [s.value for s in self.segments]
            if len(set(values)) != len(values):
                raise ValueError(f"segment values must be unique, got {values}")
            total = sum(s.share for s in self.segments)
            if abs(total - 1) > 1e-6:
                raise ValueError(f"segment shares must sum to 1, got {total:g}")
            for i, seg in enumerate(self.segments):
                unknown = sorted(set(seg.arms) - set(ids))
                if unknown:
                    raise ValueError(
                        f"segments.{i}.arms: unknown arm ids {unknown}, arms are {ids}"
                    )
        return self

    # -- derived ---------------------------------------------------------------
    @property
    def arm_ids(self) -> list[str]:
        return [a.id for a in self.arms]

    @property
    def champion_id(self) -> str:
        return self.champion or self.arms[0].id

    @property
    def has_arrivals(self) -> bool:
        """Whether any arm arrives or retires mid-run."""
        return any(a.arrives_day > 0 or a.retires_day is not None for a in self.arms)

    def present(self, days: np.ndarray) -> np.ndarray:
        """``(len(days), arms)`` mask: which arms exist at each time (in days since the start)."""
        days = np.asarray(days, dtype=float)[:, None]
        arrives = np.array([a.arrives_day for a in self.arms])[None, :]
        retires = np.array(
            [a.retires_day if a.retires_day is not None else np.inf for a in self.arms]
        )[None, :]
        return (days >= arrives) & (days < retires)

    @property
    def segment_keys(self) -> list[str]:
        """Allocation keys of the segments, as :func:`~optimizer.assignment.segment_key` builds."""
        if not self.segments:
            return [ALL_SEGMENTS]
        return [f"{self.segment_by}={s.value}" for s in self.segments]

    @property
    def segment_shares(self) -> np.ndarray:
        return np.array([s.share for s in self.segments]) if self.segments else np.ones(1)

    @property
    def conversion_window_days(self) -> float:
        """Longest attribution window of a term fed by conversions (delays are truncated to it)."""
        if self.delay.max_days is not None:
            return self.delay.max_days
        windows = [
            t.window_days
            for t in self.kpi.terms
            if t.source in ("outcome:conversion", "outcome:revenue")
        ]
        return max(windows, default=7.0)

    @property
    def delay_max_days(self) -> float:
        """Longest conversion delay drawn: the window less the conversion offset at both ends."""
        return max(self.conversion_window_days - 2 * CONVERSION_OFFSET_S / 86400, 0.0)

    @property
    def days(self) -> float:
        return self.sessions / self.sessions_per_day

    def truths(self) -> list[dict[str, ArmTruth]]:
        """Per segment (in :attr:`segment_keys` order), each arm's truth with overrides applied."""
        if not self.segments:
            return [{a.id: a for a in self.arms}]
        out = []
        for seg in self.segments:
            merged = {}
            for arm in self.arms:
                override = seg.arms.get(arm.id)
                fields = override.model_dump(exclude_unset=True) if override else {}
                merged[arm.id] = arm.model_copy(update=fields)
            out.append(merged)
        return out

    def expected_rewards(self) -> np.ndarray:
        """True expected per-session KPI, shape (segments, arms), in :attr:`arm_ids` order."""
        return np.array([[self.expected_reward(t[a]) for a in self.arm_ids] for t in self.truths()])

    def expected_reward(self, truth: ArmTruth) -> float:
        """Expected KPI of one session on an arm: Σ weight × E[min(value, cap)] over the terms."""
        total = 0.0
        for term in self.kpi.terms:
            total += term.weight * self._expected_term(term, truth)
        return total

    def _expected_term(self, term: KPITermConfig, truth: ArmTruth) -> float:
        cap = term.cap if term.cap is not None else math.inf
        window_s = term.window_days * 86400
        if term.source == "outcome:conversion":
            return truth.conversion * min(1.0, cap) * self._p_conversion_within(window_s)
        if term.source == "outcome:revenue":
            return (
                truth.conversion
                * _expected_capped_exponential(truth.revenue, cap)
                * self._p_conversion_within(window_s)
            )
        if term.source == "cost:usd":  # every turn, known at once; exact without a cap
            return min(truth.cost_per_turn * self.turns_mean, cap)
        if term.source == "outcome:support_minutes":
            if window_s < SUPPORT_OFFSET_S:
                return 0.0
            return _expected_capped_exponential(truth.support_minutes, cap)
        # Feedback terms: a session's rate is (votes of that kind) / (rated turns), and a
        # session without any rating counts 0 (see optimizer.kpi).
        p_vote = truth.thumbs_up if term.source == "feedback:up_rate" else truth.thumbs_down
        return min(p_vote, cap) * self.p_any_rating(truth)

    def p_any_rating(self, truth: ArmTruth) -> float:
        """P(a session has at least one rated turn), turns ~ 1 + Poisson(turns_mean - 1).

        A failed reply is never rated, so a turn is rated with ``rate × (1 - error_rate)``.
        """
        lam = self.turns_mean - 1
        r = truth.rate * (1.0 - truth.error_rate)
        # E[(1-r)^(1+N)] for N ~ Poisson(lam) = (1-r) exp(-lam r)
        return 1.0 - (1.0 - r) * math.exp(-lam * r)

    def _p_conversion_within(self, window_s: float) -> float:
        """P(a drawn conversion falls inside a term's window), given truncation to the max delay."""
        d_max = self.delay_max_days
        horizon_days = (window_s - CONVERSION_OFFSET_S) / 86400
        if horizon_days >= d_max:
            return 1.0
        if horizon_days < 0:
            return 0.0
        denominator = self.delay.cdf(d_max)
        return self.delay.cdf(horizon_days) / denominator if denominator > 0 else 1.0

    def allowed_arms(self) -> list[str]:
        """Arms that respect every guardrail by their true metrics (pooled over segments).

        The oracle chooses only among these: an arm that hurts users is no
        benchmark to chase.
        """
        truths = self.truths()
        shares = self.segment_shares

        def pooled(arm: str, metric: str) -> float:
            ts = [t[arm] for t in truths]
            if metric == "thumbs_down_rate":
                rated = np.array([t.rate for t in ts]) * shares
                downs = np.array([t.rate * t.thumbs_down for t in ts]) * shares
                return float(downs.sum() / rated.sum()) if rated.sum() > 0 else 0.0
            if metric == "error_rate":
                return float(np.dot(shares, [t.error_rate for t in ts]))
            return float(np.dot(shares, [t.latency_p95_ms for t in ts]))

        champion = self.champion_id
        allowed = []
        for arm in self.arm_ids:
            ok = True
            for g in self.kpi.guardrails:
                mine, theirs = pooled(arm, g.metric), pooled(champion, g.metric)
                if g.max_delta is not None and mine - theirs > g.max_delta:
                    ok = False
                if g.max_ratio is not None and theirs > 0 and mine / theirs > g.max_ratio:
                    ok = False
            if ok:
                allowed.append(arm)
        return allowed

    def oracle_arms(self) -> list[str]:
        """Best allowed arm per segment by true expected KPI (ties → first listed)."""
        rewards = self.expected_rewards()
        allowed = np.array([a in self.allowed_arms() for a in self.arm_ids])
        masked = np.where(allowed[None, :], rewards, -np.inf)
        return [self.arm_ids[int(i)] for i in masked.argmax(axis=1)]

    def is_binary_kpi(self) -> bool:
        """True when the KPI is a single 0/1 conversion term (Beta–Bernoulli applies)."""
        return len(self.kpi.terms) == 1 and self.kpi.terms[0].source == "outcome:conversion"


def _expected_capped_exponential(mean: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ Exponential(mean)."""
    if mean <= 0:
        return 0.0
    if math.isinf(cap):
        return mean
    return mean * (1 - math.exp(-cap / mean))


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] in ("value_error", "missing"):
            parts.append(f"{where}: {msg}" if where else msg)
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            parts.append(f"{where}: {msg} (got {got})")
    return f"{source}: " + "; ".join(parts)


def parse_scenario(data: Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """Validate a scenario given as a mapping; errors name ``source`` and the field.

    ``config`` (a path, relative to ``source``'s folder) takes the KPI and policy
    from a ``flywheel.toml``; the scenario's ``[policy]`` fields override the file's.
    """
    payload = dict(data)
    if "config" in payload:
        payload.update(_from_config(payload.pop("config"), payload, source))
    payload["source"] = source
    if "name" not in payload and source != "<scenario>":
        payload["name"] = Path(source).stem
    try:
        return Scenario.model_validate(payload)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def _from_config(config: Any, payload: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``kpi`` and ``policy`` of the scenario from the configuration file it names."""
    from optimizer.config import load_config

    if not isinstance(config, str) or not config:
        raise ConfigError(f"{source}: config: must be a path to a flywheel.toml, got {config!r}")
    if "kpi" in payload:
        raise ConfigError(f"{source}: set either config (the file's KPI) or [kpi], not both")
    base = Path(source).parent if source != "<scenario>" else Path.cwd()
    path = base / config
    if not path.exists():
        raise ConfigError(f"{source}: config: no such file {str(path)!r}")
    loaded = load_config(path, environ=False)
    policy = loaded.policy.model_dump()
    own = payload.get("policy", {})
    if not isinstance(own, Mapping):
        raise ConfigError(f"{source}: [policy] must be a table")
    policy.update(own)
    out: dict[str, Any] = {"kpi": loaded.kpi.model_dump(), "policy": policy}
    if "holdback" not in payload:
        out["holdback"] = loaded.experiment.holdback
    return out


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; the name defaults to the file's stem.

    >>> load_scenario("/nonexistent.toml")
    Traceback (most recent call last):
    ...
    optimizer.errors.ConfigError: /nonexistent.toml: no such scenario file
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, source=str(path))
