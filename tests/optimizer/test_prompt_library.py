from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optimizer.errors import ConfigError
from optimizer.prompt_library import load_prompts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    target = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", target)
    return target


def test_shipped_prompts_load() -> None:
    library = load_prompts(ROOT / "prompts")
    assert set(library.variants) == {"concise", "empathetic", "proactive-upsell"}
    assert "password-reset" in library.examples
    assert "Lumen Tasks" in library.knowledge
    assert len(library.variant("concise").hash) == 16


def test_hash_changes_with_content(prompts: Path) -> None:
    before = load_prompts(prompts).variant("concise").hash
    path = prompts / "variants" / "concise.md"
    path.write_text(path.read_text() + "\nBe brief.\n")
    assert load_prompts(prompts).variant("concise").hash != before


def test_whitespace_only_edit_keeps_hash(prompts: Path) -> None:
    before = load_prompts(prompts).variant("concise").hash
    path = prompts / "variants" / "concise.md"
    path.write_text(path.read_text() + "   \n\n")
    assert load_prompts(prompts).variant("concise").hash == before


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("no front matter", "missing YAML front matter"),
        ("---\nid: [unclosed\n---\nbody", "not valid YAML"),
        ("---\ndescription: d\n---\nbody", "field 'id'"),
        ("---\nid: bad id!\ndescription: d\n---\nbody", "field 'id'"),
        ("---\nid: x\n---\nbody", "field 'description'"),
        ("---\nid: x\ndescription: d\n---\n", "template"),
        ("---\n- a list\n---\nbody", "must be a mapping"),
    ],
)
def test_bad_variant_names_file_and_field(prompts: Path, content: str, needle: str) -> None:
    bad = prompts / "variants" / "zz-bad.md"
    bad.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_prompts(prompts)
    assert str(bad) in str(exc.value)
    assert needle in str(exc.value)


def test_duplicate_variant_id_refused(prompts: Path) -> None:
    shutil.copy(prompts / "variants" / "concise.md", prompts / "variants" / "concise-copy.md")
    with pytest.raises(ConfigError, match="already used"):
        load_prompts(prompts)


def test_bad_example_refused(prompts: Path) -> None:
    (prompts / "examples" / "bad.md").write_text("---\nid: bad\n---\nanswer")
    with pytest.raises(ConfigError, match="field 'user'"):
        load_prompts(prompts)


def test_unknown_variant_lookup(prompts: Path) -> None:
    with pytest.raises(ConfigError, match="no prompt variant 'nope'"):
        load_prompts(prompts).variant("nope")
