"""Domain errors of Flywheel.

Every failure that is ours (not a bad argument, which raises ``ValueError`` or
``TypeError``) derives from one root so callers can catch them together::

    FlywheelError
    ├── ConfigError       flywheel.toml, environment or a prompt file is invalid
    ├── StoreError        the event store refused or lost a write
    │   └── OwnershipError  a user acted on a message that is not theirs
    ├── PolicyError       the optimizer cannot fit or serve a policy
    ├── EstimationError   off-policy evaluation cannot be trusted or computed
    └── FineTuneError     a fine-tuning job cannot start (too little data, over the
                          spending cap) or its provider failed
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Root of every Flywheel domain error."""


class ConfigError(FlywheelError):
    """Configuration or a prompt file is invalid; the message names the file and field."""


class StoreError(FlywheelError):
    """The event store could not complete an operation."""


class OwnershipError(StoreError):
    """A user tried to act on a turn that belongs to another user's thread."""


class PolicyError(FlywheelError):
    """A policy cannot be fitted or served with the data and settings given."""


class EstimationError(FlywheelError):
    """An off-policy estimate cannot be computed from the logs given."""


class FineTuneError(FlywheelError):
    """A fine-tuning job cannot start or its provider failed; the experiment is left as it was."""
