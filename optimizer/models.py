"""The model an arm serves: any litellm model string with its own parameters.

An arm's model is a dimension of the arm (:mod:`optimizer.store.versions`):
``model`` None means the configured ``[model]`` and keeps the arm's identity,
so no arm splits when models arrive. :func:`resolve` turns an arm row into the
parameters a turn is called with; the chat side passes them to litellm
(the optimizer itself never calls a model).

``api_base`` says where a conversation is sent. It is checked against
``model.allowed_api_bases`` when an arm is configured, added (CLI, dashboard,
fine-tuning) *and* when it is served — an arm written into the store by an
older deployment with a longer list is refused, not obeyed.

>>> from optimizer.config import load_config
>>> cfg = load_config("/nonexistent.toml", environ=False)
>>> resolve(None, {}, cfg.model).name == cfg.model.name
True
>>> resolve("openai/ft:x", {"temperature": 0.2}, cfg.model).temperature
0.2
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.config import ModelConfig
from optimizer.errors import ConfigError

__all__ = ["ArmModel", "check_model_params", "resolve"]

_PARAMS = ("temperature", "max_tokens", "api_base")


@dataclass(frozen=True)
class ArmModel:
    """What a turn of an arm is called with. ``default``: the arm has no model of its own."""

    name: str
    temperature: float
    max_tokens: int
    api_base: str | None = None
    default: bool = True


def check_model_params(
    model: str | None, params: Mapping[str, Any], allowed_api_bases: tuple[str, ...]
) -> dict[str, Any]:
    """Validated copy of an arm's model parameters; raises ``ValueError`` naming the field.

    >>> check_model_params("openai/x", {"api_base": "http://evil"}, ("http://127.0.0.1:9",))
    Traceback (most recent call last):
    ...
    ValueError: api_base 'http://evil' is not in model.allowed_api_bases ['http://127.0.0.1:9']
    """
    from optimizer.config import ArmConfig

    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise ValueError(f"model parameters may be {list(_PARAMS)}, got unknown {unknown}")
    arm = ArmConfig.model_validate({"id": "x", "prompt": "x", "model": model, **params})
    if arm.api_base is not None and arm.api_base not in allowed_api_bases:
        raise ValueError(
            f"api_base {arm.api_base!r} is not in model.allowed_api_bases "
            f"{sorted(allowed_api_bases)}"
        )
    return arm.model_params


def resolve(model: str | None, params: Mapping[str, Any] | None, config: ModelConfig) -> ArmModel:
    """The model and parameters of an arm (``model`` None: the configured model).

    Raises :class:`ConfigError` if the arm's ``api_base`` is not allowed (any more).
    """
    if model is None:
        return ArmModel(config.name, config.temperature, config.max_tokens)
    try:
        p = check_model_params(model, dict(params or {}), config.allowed_api_bases)
    except ValueError as exc:
        raise ConfigError(f"arm model {model!r}: {exc}") from None
    return ArmModel(
        name=model,
        temperature=float(p.get("temperature", config.temperature)),
        max_tokens=int(p.get("max_tokens", config.max_tokens)),
        api_base=p.get("api_base"),
        default=False,
    )
