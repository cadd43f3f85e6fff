"""The public names of each package are deliberate: changing them is an API change."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            "optimizer",
            [
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
            ],
        ),
        (
            "optimizer.store",
            [
                "ACTIVE_STATUSES",
                "ArmSpec",
                "AssignmentRecord",
                "OutcomeRecord",
                "Store",
                "TurnRecord",
                "VoteRecord",
                "is_postgres",
                "make_engine",
                "normalise_url",
            ],
        ),
        (
            "optimizer.finetune",
            [
                "FINAL_STATES",
                "FineTuneHooks",
                "FineTuneProvider",
                "JobRecord",
                "JobState",
                "TrainingSet",
                "actual_cost",
                "build_training_set",
                "estimated_cost",
                "finetune_step",
                "jobs",
                "poll_job",
                "qualify_terms",
                "qualifying_sessions",
                "retrain_due",
                "spent",
                "start_job",
            ],
        ),
    ],
)
def test_public_names(module: str, expected: list[str]) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ == sorted(mod.__all__), "__all__ must stay sorted"
    assert mod.__all__ == expected
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"
