"""``flywheel users …`` and ``flywheel keys …``: logins and outcome-API keys in the database.

Both act on the store every replica reads, so a change applies to the next
request everywhere without a restart: a new password or a removal ends the
user's chat and operator sessions; a revoked key stops working.

    flywheel users add alice --role operator --attr plan=pro   # asks for the password
    printf '%s' "$PW" | flywheel users passwd alice --password-stdin
    flywheel keys create crm                                   # prints the key once
    flywheel keys revoke crm
"""

from __future__ import annotations

import sys

import typer

from optimizer.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    console,
    fail,
    get_config,
    open_store,
    print_json,
)
from optimizer.errors import StoreError
from optimizer.store.accounts import Accounts

__all__ = ["keys_app", "register", "users_app"]

users_app = typer.Typer(help="Chat and operator logins kept in the database.", no_args_is_help=True)
keys_app = typer.Typer(help="Named API keys for POST /api/outcomes.", no_args_is_help=True)

PasswordStdin = typer.Option(
    False, "--password-stdin", help="Read the password from standard input (for scripts)."
)


def register(app: typer.Typer) -> None:
    """Add the ``users`` and ``keys`` groups to ``app``."""
    app.add_typer(users_app, name="users")
    app.add_typer(keys_app, name="keys")


def _accounts(config: str | None, database_url: str | None) -> Accounts:
    return Accounts(open_store(get_config(config), database_url).engine)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        fail(f"password must have at least 8 characters, got {len(password)}", 2)
    return password


def _attributes(pairs: list[str]) -> dict[str, str]:
    attributes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--attr must look like key=value, got {pair!r}", 2)
        attributes[key.strip()] = value.strip()
    return attributes


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option("user", "--role", help="user (chat) or operator (dashboard)."),
    attr: list[str] = typer.Option([], "--attr", help="key=value attribute (repeatable)."),
    password_stdin: bool = PasswordStdin,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Create a login (bcrypt-hashed password, a role, attributes)."""
    from chatbot.web.auth import hash_password

    if role not in ("user", "operator"):
        fail(f"--role must be user or operator, got {role!r}", 2)
    attributes = _attributes(attr)
    accounts = _accounts(config, database_url)
    try:
        accounts.add_user(
            name, hash_password(_password(password_stdin)), role=role, attributes=attributes
        )
    except (StoreError, ValueError) as exc:
        fail(str(exc), 1)
    console.print(f"user [bold]{name}[/bold] added ({role})")


@users_app.command("passwd")
def users_passwd(
    name: str = typer.Argument(..., help="Login name."),
    password_stdin: bool = PasswordStdin,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Set a new password; every session of the user ends."""
    from chatbot.web.auth import hash_password

    accounts = _accounts(config, database_url)
    try:
        accounts.set_password(name, hash_password(_password(password_stdin)))
    except StoreError as exc:
        fail(str(exc), 1)
    console.print(f"password of [bold]{name}[/bold] changed; their sessions have ended")


@users_app.command("remove")
def users_remove(
    name: str = typer.Argument(..., help="Login name."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Remove a login; every session of the user ends."""
    try:
        _accounts(config, database_url).remove_user(name)
    except StoreError as exc:
        fail(str(exc), 1)
    console.print(f"user [bold]{name}[/bold] removed; their sessions have ended")


@users_app.command("list")
def users_list(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Logins in the database (not the ``[auth.users]`` of the file, nor demo logins)."""
    users = _accounts(config, database_url).users()
    if as_json:
        print_json([{"name": u.name, "role": u.role, "attributes": u.attributes} for u in users])
        return
    for u in users:
        console.print(f"{u.name}\t{u.role}\t{u.attributes or ''}", markup=False, highlight=False)


@users_app.command("hash")
def users_hash(password_stdin: bool = PasswordStdin) -> None:
    """Print a bcrypt hash for ``[auth.users]`` in flywheel.toml."""
    from chatbot.web.auth import hash_password

    typer.echo(hash_password(_password(password_stdin)))


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who uses the key, e.g. crm or checkout."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    try:
        key = _accounts(config, database_url).create_key(name)
    except (StoreError, ValueError) as exc:
        fail(str(exc), 1)
    if as_json:
        print_json({"id": key.id, "name": key.name, "key": key.secret})
        return
    console.print(f"key [bold]{name}[/bold] (id {key.id}) — shown once, store it now:")
    typer.echo(key.secret)


@keys_app.command("list")
def keys_list(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Keys with when they were created, last used and revoked (never the keys themselves)."""
    rows = [
        {
            "id": k.id,
            "name": k.name,
            "created_at": k.created_at.isoformat(),
            "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in _accounts(config, database_url).api_keys()
    ]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        console.print(
            f"{r['name']}\t{r['id']}\tcreated {r['created_at']}\t"
            f"last used {r['last_used_at'] or 'never'}\t{state}",
            markup=False,
            highlight=False,
        )


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="Key name or id."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Revoke a key: every replica refuses it from the next request."""
    try:
        _accounts(config, database_url).revoke_key(name)
    except StoreError as exc:
        fail(str(exc), 1)
    console.print(f"key [bold]{name}[/bold] revoked")
