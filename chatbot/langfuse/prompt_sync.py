"""Push the prompt variants in ``prompts/`` to Langfuse prompt management.

``flywheel langfuse sync-prompts`` calls :func:`sync_prompts`: every variant
becomes a Langfuse text prompt named by its id. A new version is created only
when the variant's content hash differs from the one stored in the latest
version's ``config`` (``flywheel_hash``), so running it twice changes nothing.
The champion arm's variant carries the ``production`` label; the ids of the
arms that serve a variant are its tags.

The files stay authoritative and the chat path never fetches a prompt from
Langfuse: the version numbers learned here are written to a small JSON file
(``$FLYWHEEL_HOME/langfuse-prompts.json``, mapping variant id → content hash →
version) that :class:`~chatbot.langfuse.tracer.LangfuseTracer` reads to link each
generation to the prompt version it used.

Langfuse semantics to know: labels are unique across a prompt's versions and
the API can add a label but never remove one (``PATCH …/versions/{n}`` merges),
so a former champion keeps ``production`` on its last version until someone
removes it in the UI; tags are set on all versions, but only when a version is
created, so new arm ids appear with the variant's next version.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optimizer import settings
from optimizer.config import ArmConfig
from optimizer.prompt_library import PromptLibrary, Variant

if TYPE_CHECKING:
    from langfuse.api import LangfuseAPI

log = logging.getLogger(__name__)

__all__ = ["PromptSync", "PromptVersionCache", "prompt_cache_path", "sync_prompts"]

#: Key in a Langfuse prompt version's ``config`` holding the variant's content hash.
HASH_KEY = "flywheel_hash"
PRODUCTION = "production"
CACHE_FILE = "langfuse-prompts.json"


def prompt_cache_path() -> Path:
    """Where the variant → hash → Langfuse version map lives (under ``FLYWHEEL_HOME``)."""
    return settings.home_dir() / CACHE_FILE


class PromptVersionCache:
    """The version map written by :func:`sync_prompts`, re-read when the file changes.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "v.json"
    >>> cache = PromptVersionCache(path)
    >>> cache.record("concise", "abc", 3)
    >>> cache.lookup("concise", "abc"), cache.lookup("concise", "other")
    (3, None)
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._data: dict[str, dict[str, int]] = {}

    def _file(self) -> Path:
        return self.path if self.path is not None else prompt_cache_path()

    def lookup(self, prompt_id: str, prompt_hash: str) -> int | None:
        """Langfuse version of this content of the variant, if a sync recorded one."""
        with self._lock:
            self._reload()
            return self._data.get(prompt_id, {}).get(prompt_hash)

    def record(self, prompt_id: str, prompt_hash: str, version: int) -> None:
        """Remember a version (atomically rewriting the file)."""
        with self._lock:
            self._reload()
            self._data.setdefault(prompt_id, {})[prompt_hash] = int(version)
            path = self._file()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".langfuse-prompts.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._data, fh, indent=2, sort_keys=True)
            os.replace(tmp, path)
            self._mtime = path.stat().st_mtime

    def _reload(self) -> None:
        path = self._file()
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._data = {
                str(p): {str(h): int(v) for h, v in versions.items()} for p, versions in raw.items()
            }
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s: unreadable prompt version map (%s); prompts stay unlinked", path, exc)
        self._mtime = mtime


@dataclass(frozen=True)
class PromptSync:
    """What happened to one variant: ``created``, ``labelled`` or ``unchanged``."""

    prompt_id: str
    version: int
    action: Literal["created", "labelled", "unchanged"]
    hash: str
    labels: tuple[str, ...]
    tags: tuple[str, ...]


def sync_prompts(
    api: LangfuseAPI,
    library: PromptLibrary,
    arms: Sequence[ArmConfig],
    *,
    champion_arm: str | None = None,
    cache: PromptVersionCache | None = None,
) -> list[PromptSync]:
    """Make Langfuse hold the current content of every variant; return what changed.

    ``champion_arm`` names the arm whose variant gets ``production``. Raises
    the SDK's API errors (the CLI reports them); variants synced before an
    error keep their new versions.
    """
    cache = cache or PromptVersionCache()
    champion_prompt = next((a.prompt for a in arms if a.id == champion_arm), None)
    results = []
    for variant in sorted(library.variants.values(), key=lambda v: v.id):
        tags = tuple(sorted({"flywheel", *(a.id for a in arms if a.prompt == variant.id)}))
        result = _sync_one(api, variant, tags, production=variant.id == champion_prompt)
        cache.record(variant.id, variant.hash, result.version)
        results.append(result)
        log.info("prompt %s: %s (version %d)", variant.id, result.action, result.version)
    return results


def _sync_one(
    api: LangfuseAPI, variant: Variant, tags: tuple[str, ...], *, production: bool
) -> PromptSync:
    from langfuse.api import CreateTextPromptRequest, NotFoundError

    try:
        latest: Any = api.prompts.get(variant.id, label="latest")
    except NotFoundError:
        latest = None
    if latest is not None and _config(latest).get(HASH_KEY) == variant.hash:
        labels = tuple(latest.labels)
        if production and PRODUCTION not in labels:
            updated = api.prompt_version.update(
                name=variant.id, version=latest.version, new_labels=[PRODUCTION]
            )
            return PromptSync(
                variant.id,
                latest.version,
                "labelled",
                variant.hash,
                tuple(updated.labels),
                tuple(latest.tags),
            )
        return PromptSync(
            variant.id, latest.version, "unchanged", variant.hash, labels, tuple(latest.tags)
        )
    created: Any = api.prompts.create(
        request=CreateTextPromptRequest(
            name=variant.id,
            prompt=variant.template,
            labels=[PRODUCTION] if production else [],
            tags=list(tags),
            config={
                HASH_KEY: variant.hash,
                "description": variant.description,
                "source": variant.path,
            },
            commit_message=f"flywheel: {Path(variant.path).name} @ {variant.hash}",
        )
    )
    return PromptSync(
        variant.id,
        created.version,
        "created",
        variant.hash,
        tuple(created.labels),
        tuple(created.tags),
    )


def _config(prompt: Any) -> Mapping[str, Any]:
    config = getattr(prompt, "config", None)
    return config if isinstance(config, Mapping) else {}
