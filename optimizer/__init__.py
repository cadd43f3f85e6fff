"""The flywheel's brain, no web code: config, store, KPI, policies, few-shot, OPE, reports."""

from __future__ import annotations

from optimizer.assignment import Assigner, choose_arm
from optimizer.config import Config, load_config
from optimizer.errors import (
    ConfigError,
    EstimationError,
    FlywheelError,
    OwnershipError,
    PolicyError,
    StoreError,
)
from optimizer.prompt_library import PromptLibrary, load_prompts
from optimizer.store import Store

__all__ = [
    "Assigner",
    "Config",
    "ConfigError",
    "EstimationError",
    "FlywheelError",
    "OwnershipError",
    "PolicyError",
    "PromptLibrary",
    "Store",
    "StoreError",
    "choose_arm",
    "load_config",
    "load_prompts",
]
