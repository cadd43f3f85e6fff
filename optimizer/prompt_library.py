"""Prompt variants, seed few-shot examples and the knowledge base, read from ``prompts/``.

Layout::

    prompts/variants/<id>.md    front matter: id, description; body: the system text
    prompts/examples/<id>.md    front matter: id, user; body: the assistant's answer
    prompts/knowledge/*.md      plain Markdown, concatenated in name order

Files are validated at load time; a bad file raises :class:`ConfigError`
naming the file and the field. A variant's ``hash`` is the SHA-256 of its
normalised content, so an edited file is a new prompt version.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from optimizer.errors import ConfigError

if TYPE_CHECKING:
    from optimizer.config import ArmConfig
    from optimizer.store import ArmSpec

__all__ = ["Example", "PromptLibrary", "Variant", "arm_spec", "load_prompts"]

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n?(.*)\Z", re.DOTALL)
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Variant:
    id: str
    description: str
    template: str
    hash: str
    path: str


@dataclass(frozen=True)
class Example:
    id: str
    user: str
    assistant: str
    path: str


@dataclass(frozen=True)
class PromptLibrary:
    variants: dict[str, Variant]
    examples: dict[str, Example]
    knowledge: str

    def variant(self, variant_id: str) -> Variant:
        try:
            return self.variants[variant_id]
        except KeyError:
            raise ConfigError(
                f"no prompt variant {variant_id!r}; known: {sorted(self.variants)}"
            ) from None


def content_hash(text: str) -> str:
    normalised = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()[:16]


def _parse(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text(encoding="utf-8")
    match = _FRONT_MATTER.match(text)
    if not match:
        raise ConfigError(f"{path}: missing YAML front matter (a '---' block at the top)")
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: front matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: front matter must be a mapping, got {type(meta).__name__}")
    return meta, match.group(2).strip()


def _field(path: Path, meta: dict[str, Any], name: str) -> str:
    value = meta.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: field '{name}' must be a non-empty string, got {value!r}")
    return value.strip()


def _load_variant(path: Path) -> Variant:
    meta, body = _parse(path)
    variant_id = _field(path, meta, "id")
    if not _ID.match(variant_id):
        raise ConfigError(
            f"{path}: field 'id' may hold letters, digits, '_', '.', '-', got {variant_id!r}"
        )
    template = meta.get("template", body)
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{path}: field 'template' (or the body) must be non-empty text")
    description = _field(path, meta, "description")
    return Variant(
        variant_id,
        description,
        template.strip(),
        content_hash(path.read_text(encoding="utf-8")),
        str(path),
    )


def _load_example(path: Path) -> Example:
    meta, body = _parse(path)
    example_id = _field(path, meta, "id")
    if not body:
        raise ConfigError(f"{path}: the body (the assistant's answer) is empty")
    return Example(example_id, _field(path, meta, "user"), body, str(path))


def load_prompts(directory: str | Path = "prompts") -> PromptLibrary:
    """Load every variant, example and knowledge file under ``directory``."""
    root = Path(directory)
    if not (root / "variants").is_dir():
        raise ConfigError(f"{root}: no 'variants' folder of prompt variants")
    variants: dict[str, Variant] = {}
    for path in sorted((root / "variants").glob("*.md")):
        variant = _load_variant(path)
        if variant.id in variants:
            raise ConfigError(
                f"{path}: field 'id' {variant.id!r} already used by {variants[variant.id].path}"
            )
        variants[variant.id] = variant
    if not variants:
        raise ConfigError(f"{root / 'variants'}: no prompt variants (*.md)")
    examples: dict[str, Example] = {}
    for path in sorted((root / "examples").glob("*.md")) if (root / "examples").is_dir() else []:
        example = _load_example(path)
        if example.id in examples:
            raise ConfigError(
                f"{path}: field 'id' {example.id!r} already used by {examples[example.id].path}"
            )
        examples[example.id] = example
    knowledge_dir = root / "knowledge"
    knowledge = (
        "\n\n".join(
            p.read_text(encoding="utf-8").strip() for p in sorted(knowledge_dir.glob("*.md"))
        )
        if knowledge_dir.is_dir()
        else ""
    )
    return PromptLibrary(variants, examples, knowledge)


def arm_spec(arm: ArmConfig, prompts: PromptLibrary) -> ArmSpec:
    """What a configured arm serves, as the store versions it: prompt text, few-shot, model."""
    from optimizer.store import ArmSpec

    fewshot: dict[str, Any] = {}
    if arm.fewshot == "fixed":
        fewshot = {"examples": list(arm.examples)}
    elif arm.fewshot == "retrieved":
        fewshot = {"k": arm.k, "reward_weighted": arm.reward_weighted}
    variant = prompts.variant(arm.prompt)
    return ArmSpec(
        arm.id,
        arm.prompt,
        variant.hash,
        arm.fewshot,
        fewshot,
        prompt_text=variant.template,
        model=arm.model,
        model_params=arm.model_params,
    )
