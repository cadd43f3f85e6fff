"""ARCHITECTURE.md's table of rooms is the import rule; this test keeps the two in step.

Every import in ``chatbot/`` and ``optimizer/`` (at module level or inside a
function; ``if TYPE_CHECKING:`` blocks excepted, they never run) must go to the
module's own room or to a room the table allows, and no import circle may exist
between modules, lazy imports included: a circle hidden in a function is still a
circle for the reader.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("chatbot", "optimizer")


def _rooms() -> dict[str, set[str]]:
    """Room → rooms it may import, from the table in ARCHITECTURE.md."""
    rooms: dict[str, set[str]] = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        allowed = set(re.findall(r"`([\w.]+)`", cells[2]))
        for room in re.findall(r"`([\w.]+)`", cells[0]):
            rooms[room] = allowed
    return rooms


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:  # Alembic loads these by path
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Our modules that ``path`` imports (``from a import b`` is ``a.b`` when that is a module)."""

    def walk(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    yield full if full in modules else child.module
            yield from walk(child)

    return (name for name in walk(ast.parse(path.read_text())) if name in modules)


def _room(module: str, rooms: dict[str, set[str]]) -> str:
    matches = [r for r in rooms if module == r or module.startswith(r + ".")]
    assert matches, f"{module} is in no room of ARCHITECTURE.md"
    return max(matches, key=len)


MODULES = _modules()
GRAPH = {name: set(_imports(path, MODULES)) for name, path in MODULES.items()}


def test_the_table_names_real_rooms() -> None:
    rooms = _rooms()
    assert {"optimizer", "chatbot.llm", "chatbot.web", "chatbot.cli"} <= set(rooms)
    for room, allowed in rooms.items():
        for name in {room, *allowed}:
            assert name in MODULES, f"ARCHITECTURE.md names {name!r}, which is not a module"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_rooms(module: str) -> None:
    rooms = _rooms()
    room = _room(module, rooms)
    allowed = {room, *rooms[room]}
    wrong = sorted(
        target
        for target in GRAPH[module]
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    )
    assert wrong == [], f"{module} (room {room}) imports {wrong}; ARCHITECTURE.md allows {allowed}"


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_rule_catches_a_violation() -> None:
    # The check itself must be able to fail: optimizer importing the chat side is refused.
    rooms = _rooms()
    assert "chatbot.web" not in rooms[_room("optimizer.refit", rooms)]
    assert "chatbot" not in rooms["optimizer"]
