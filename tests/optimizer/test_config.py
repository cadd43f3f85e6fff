from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.config import load_config
from optimizer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flywheel.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "flywheel.toml", environ=False)
    assert config.experiment.champion == "concise"
    assert {a.id for a in config.experiment.arms} >= {"concise", "concise+retrieved"}
    assert config.kpi.terms[0].source == "outcome:conversion"


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.toml", environ=False)
    assert config.policy.burn_in == 100
    assert config.model.name == "local/gemma3-270m"
    assert config.database_url.startswith("sqlite:///")


def test_error_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "[[kpi.terms]]\nname='x'\nsource='outcome:x'\nweight=nan\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ=False)
    assert str(path) in str(exc.value)
    assert "kpi.terms.0.weight" in str(exc.value)
    assert "finite" in str(exc.value)


def test_unknown_field_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nburnin = 3\n")
    with pytest.raises(ConfigError, match=r"policy\.burnin"):
        load_config(path, environ=False)


def test_bad_toml_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ=False)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[policy]\nfloor = 1.5\n", "policy.floor"),
        (
            "[experiment]\nchampion='nope'\n[[experiment.arms]]\nid='a'\nprompt='concise'\n",
            "champion",
        ),
        (
            "[[experiment.arms]]\nid='a'\nprompt='p'\n[[experiment.arms]]\nid='a'\nprompt='p'\n",
            "duplicates",
        ),
        ("[[experiment.arms]]\nid='a'\nprompt='p'\nfewshot='fixed'\n", "examples"),
        ("[[kpi.guardrails]]\nmetric='error_rate'\n", "exactly one"),
        ("[[kpi.terms]]\nname='x'\nsource='clicks'\nweight=1\n", "kpi.terms.0.source"),
    ],
)
def test_invalid_values_explained(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(write(tmp_path, text), environ=False)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[model]\nname='local/gemma3-270m'\n")
    monkeypatch.setenv("FLYWHEEL_MODEL", "fake/echo")
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("FLYWHEEL_DEMO", "0")
    config = load_config(path)
    assert config.model.name == "fake/echo"
    assert config.database_url == "sqlite:///x.db"
    assert config.auth.demo is False


def test_bad_environment_value_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_OPTIMIZE_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="FLYWHEEL_OPTIMIZE_INTERVAL"):
        load_config(tmp_path / "absent.toml")
