"""chatbot.web.auth: password logins from the configuration, demo logins, the session secret."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import bcrypt
import pytest

from chatbot.web.auth import AUTH_SECRET_ENV, Authenticator, Login, ensure_auth_secret
from optimizer.config import AuthConfig, UserConfig


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def users() -> tuple[UserConfig, ...]:
    return (
        UserConfig(name="alice", password_hash=_hash("correct horse"), role="operator"),
        UserConfig(name="demo", password_hash=_hash("not-demo")),  # a real user named demo
    )


def test_configured_users_log_in_with_their_password_only(users: tuple[UserConfig, ...]) -> None:
    auth = Authenticator(AuthConfig(demo=False, users=users))
    assert auth.check("alice", "correct horse") == Login("alice", "operator")
    assert auth.check("alice", "Correct horse") is None
    assert auth.check("alice", "") is None
    assert (
        auth.check("bob", "correct horse") is None
    )  # unknown name: same answer as a wrong password


def test_demo_logins_exist_only_in_demo_mode() -> None:
    on, off = Authenticator(AuthConfig(demo=True)), Authenticator(AuthConfig(demo=False))
    assert on.check("demo", "demo") == Login("demo", "user")
    assert on.check("operator", "operator") == Login("operator", "operator")
    assert on.check("demo", "operator") is None
    assert off.check("demo", "demo") is None and off.check("operator", "operator") is None


def test_a_configured_user_replaces_the_demo_login_of_the_same_name(
    users: tuple[UserConfig, ...],
) -> None:
    auth = Authenticator(AuthConfig(demo=True, users=users))
    assert auth.check("demo", "demo") is None
    assert auth.check("demo", "not-demo") == Login("demo", "user")
    assert auth.check("operator", "operator") == Login("operator", "operator")


def test_odd_passwords_and_bad_hashes_are_refused_not_crashed() -> None:
    long_password = "p" * 100  # bcrypt reads 72 bytes; longer input must not raise
    auth = Authenticator(
        AuthConfig(
            demo=False,
            users=(
                UserConfig(name="long", password_hash=_hash(long_password[:72])),
                UserConfig(name="broken", password_hash="not-a-bcrypt-hash-at-all"),
            ),
        )
    )
    assert auth.check("long", long_password) == Login("long", "user")
    assert auth.check("long", "p" * 10) is None
    assert auth.check("broken", "anything") is None
    assert auth.check("nobody", "ünïcødé 🙂") is None


def test_the_session_secret_is_generated_once_privately_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTH_SECRET_ENV, "")  # empty counts as unset; restored after the test
    secret = ensure_auth_secret(tmp_path)
    path = tmp_path / "auth_secret"
    assert len(secret) >= 32 and path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.environ[AUTH_SECRET_ENV] == secret

    monkeypatch.setenv(AUTH_SECRET_ENV, "")
    assert ensure_auth_secret(tmp_path) == secret  # a restart keeps sessions valid


def test_an_explicit_secret_wins_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTH_SECRET_ENV, "from-the-environment")
    assert ensure_auth_secret(tmp_path) == "from-the-environment"
    assert not (tmp_path / "auth_secret").exists()


def test_an_empty_secret_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_SECRET_ENV, "")
    (tmp_path / "auth_secret").write_text("")
    with pytest.raises(RuntimeError, match="is empty"):
        ensure_auth_secret(tmp_path)


def test_database_users_log_in_until_removed(tmp_path: Path) -> None:
    from chatbot.web.auth import hash_password
    from optimizer.store import Store
    from optimizer.store.accounts import Accounts

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    accounts = Accounts(store.engine)
    accounts.add_user("demo", hash_password("their-own-pw", rounds=4), attributes={"plan": "pro"})
    auth = Authenticator(AuthConfig(demo=True), accounts)
    who = auth.check("demo", "their-own-pw")
    assert who == Login("demo", "user") and who is not None and who.attributes == {"plan": "pro"}
    assert auth.check("demo", "demo") is None  # the database user replaces the demo login
    accounts.remove_user("demo")
    assert auth.check("demo", "their-own-pw") is None
    assert auth.check("demo", "demo") is None  # nor does a removal bring the demo login back
    assert auth.check("operator", "operator") == Login("operator", "operator")
