"""The security suite: attacks on a server that has left localhost, each of which must fail.

Every test runs the whole app (``chatbot.web.server.create_app``: Chainlit, the
operator pages, the outcomes API, the guards of ``chatbot.web.security``) over a
real store, through Starlette's test client with cookies, as a browser or a
script would. The attacks and the answers they must get:

=========================================================  ==========================
attack                                                     answer
=========================================================  ==========================
``flywheel serve --host 0.0.0.0`` with demo logins on      exit 2, one-line reason
cross-origin read with the session cookie (evil origin)    no CORS headers
cross-origin preflight / POST /login from evil origin      403
cross-origin websocket                                     closed (1008)
password guessing on /login and /operator/login            429 + Retry-After, backoff
the same, spread over two replicas                         429 from the other one
guessing many accounts from one address                    429 for that address only
spoofed X-Forwarded-For from an untrusted peer             ignored
chat session after ``users passwd`` / ``users remove``     401, cookie cleared
operator session after ``users passwd``                    back to the login form
revoked outcome-API key                                    401, no restart
planted session cookie (fixation), chat and operator       refused / replaced at login
operator action without / with a wrong CSRF token          403, nothing changes
operator action with a chat user's session                 401, nothing changes
another user's thread through Chainlit's thread routes     401 / 404, nothing changes
=========================================================  ==========================
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from chainlit import data as chainlit_data
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from chatbot.cli import app as cli
from chatbot.runtime import Runtime
from chatbot.web.auth import hash_password
from chatbot.web.operator import PREFIX, create_router
from chatbot.web.operator.actions import ARM_ACTIONS
from chatbot.web.operator.security import COOKIE_NAME, OperatorSession, SessionSigner
from chatbot.web.server import create_app
from optimizer.config import AuthConfig, Config, SecurityConfig
from optimizer.errors import ConfigError
from optimizer.store import Store, schema
from optimizer.store.accounts import Accounts
from tests.support.chat_helpers import RecordingTracer, chat_config

ROOT = Path(__file__).resolve().parents[2]
AUTH_SECRET = "security-suite-secret-" + "x" * 32
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "olga": "olga-password"}


def _config(store: Store, **security: Any) -> Config:
    return chat_config(store.url).model_copy(
        update={"auth": AuthConfig(demo=True), "security": SecurityConfig(**security)}
    )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", AUTH_SECRET)
    monkeypatch.setenv("FLYWHEEL_API_KEY", "legacy-env-key")
    monkeypatch.setattr(chainlit_data, "_data_layer", None)
    monkeypatch.setattr(chainlit_data, "_data_layer_initialized", False)


@pytest.fixture
def accounts(store: Store) -> Accounts:
    accounts = Accounts(store.engine)
    accounts.add_user("alice", hash_password(PASSWORDS["alice"], rounds=4), attributes={})
    accounts.add_user("bob", hash_password(PASSWORDS["bob"], rounds=4), attributes={})
    accounts.add_user(
        "olga", hash_password(PASSWORDS["olga"], rounds=4), role="operator", attributes={}
    )
    return accounts


def _runtime(store: Store, **security: Any) -> Runtime:
    return Runtime.build(
        _config(store, **security), store=store, tracer=RecordingTracer(), migrate=False
    )


@pytest.fixture
def server(env: None, store: Store, accounts: Accounts) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=_runtime(store))) as client:
        yield client


def chat_login(client: TestClient, name: str, password: str | None = None) -> str:
    response = client.post(
        "/login", data={"username": name, "password": password or PASSWORDS[name]}
    )
    assert response.status_code == 200, response.text
    return str(response.cookies["access_token"])


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "page has no CSRF field"
    return match.group(1)


def operator_login(client: TestClient, name: str = "olga") -> str:
    token = csrf_of(client.get(f"{PREFIX}/login").text)
    response = client.post(
        f"{PREFIX}/login", data={"csrf": token, "username": name, "password": PASSWORDS[name]}
    )
    assert response.status_code == 200 and "login" not in str(response.url), response.text
    return csrf_of(response.text)


def audit(store: Store) -> list[str]:
    au = schema.audit_events
    with store.engine.connect() as conn:
        return [r.action for r in conn.execute(sa.select(au.c.action).order_by(au.c.id))]


# -- secure defaults -------------------------------------------------------------------


@pytest.fixture
def serve_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: None
) -> Iterator[list[dict[str, Any]]]:
    """``flywheel serve`` up to the point where uvicorn would bind (the boundary is faked)."""
    import uvicorn

    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("FLYWHEEL_MODEL", "fake/echo")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(ROOT / "flywheel.toml"))
    monkeypatch.setenv("FLYWHEEL_PROMPTS_DIR", str(ROOT / "prompts"))
    monkeypatch.setenv("FLYWHEEL_OPTIMIZE_INTERVAL", "0")
    monkeypatch.delenv("FLYWHEEL_ALLOW_DEMO_LOGINS", raising=False)
    monkeypatch.delenv("FLYWHEEL_DEMO", raising=False)
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    yield runs


def test_demo_logins_on_a_public_interface_refuse_to_start(
    serve_env: list[dict[str, Any]],
) -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and serve_env == []
    lines = [line for line in result.output.splitlines() if "refusing" in line]
    assert len(lines) == 1 and "--allow-demo-logins" in lines[0], result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_demo_logins_start_on_loopback(serve_env: list[dict[str, Any]], host: str) -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", host])
    assert result.exit_code == 0, result.output
    assert serve_env[0]["host"] == host and serve_env[0]["proxy_headers"] is False


def test_the_override_starts_and_warns_every_time(
    serve_env: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="chatbot.serve"):
            result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--allow-demo-logins"])
        assert result.exit_code == 0, result.output
    warnings = [r for r in caplog.records if "demo logins" in r.getMessage()]
    assert len(serve_env) == 2 and len(warnings) == 2


def test_demo_logins_off_start_anywhere(
    serve_env: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_DEMO", "0")
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output


# -- CORS ------------------------------------------------------------------------------


def test_shipped_configuration_has_no_cors_wildcard() -> None:
    import tomllib

    chainlit = tomllib.loads((ROOT / ".chainlit" / "config.toml").read_text(encoding="utf-8"))
    flywheel = tomllib.loads((ROOT / "flywheel.toml").read_text(encoding="utf-8"))
    assert chainlit["project"]["allow_origins"] == []
    assert flywheel["security"]["allowed_origins"] == []
    with pytest.raises(ValueError, match="not '\\*'"):
        SecurityConfig(allowed_origins=("*",))


def test_a_wildcard_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    from optimizer.config import load_config

    path = tmp_path / "flywheel.toml"
    path.write_text('[security]\nallowed_origins = ["*"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"security\.allowed_origins"):
        load_config(path, environ=False)


def test_a_foreign_origin_gets_no_credentialed_cors(server: TestClient) -> None:
    chat_login(server, "alice")
    evil = {"Origin": "http://evil.example"}
    read = server.get("/user", headers=evil)
    assert read.status_code == 200  # the browser would get it, but its page may not read it:
    assert "access-control-allow-origin" not in read.headers
    assert "access-control-allow-credentials" not in read.headers
    preflight = server.options(
        "/project/threads", headers={**evil, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    forged = server.post("/login", data={"username": "alice", "password": "x"}, headers=evil)
    assert forged.status_code == 403
    assert "not allowed" in forged.json()["detail"]
    same = server.get("/user", headers={"Origin": "http://testserver"})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


def test_a_foreign_websocket_is_closed(server: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect

    with (
        pytest.raises(WebSocketDisconnect) as closed,
        server.websocket_connect(
            "/ws/socket.io/?EIO=4&transport=websocket", headers={"Origin": "http://evil.example"}
        ),
    ):
        pass
    assert closed.value.code == 1008


def test_a_listed_origin_gets_cors_for_itself_only(
    env: None, store: Store, accounts: Accounts
) -> None:
    app = create_app(runtime=_runtime(store, allowed_origins=("https://app.example.com",)))
    with TestClient(app) as client:
        chat_login(client, "alice")
        ok = client.get("/user", headers={"Origin": "https://app.example.com"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        assert ok.headers["access-control-allow-credentials"] == "true"
        other = client.get("/user", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# -- login throttling --------------------------------------------------------------------


def _throttled_config(**extra: Any) -> dict[str, Any]:
    return {
        "login_free_failures": 3,
        "login_backoff_s": 1.0,
        "login_max_backoff_s": 1.0,
        **extra,
    }


def test_brute_force_on_chat_login_is_slowed_to_the_configured_rate(
    env: None, store: Store, accounts: Accounts
) -> None:
    """3 free guesses, then one per second; bob logs in normally throughout."""
    app = create_app(runtime=_runtime(store, **_throttled_config()))
    answers: list[int] = []
    with TestClient(app) as client, TestClient(app, client=("10.9.9.9", 4000)) as bob:
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            response = client.post("/login", data={"username": "alice", "password": "guess"})
            answers.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert "too many failed logins for this account" in response.json()["detail"]
            if len(answers) % 5 == 0:
                chat_login(bob, "bob")  # another user is not slowed down
        elapsed = time.monotonic() - started
        # During the backoff the owner is refused too, with the same 429 (documented).
        owner = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
        assert owner.status_code == 429
    checked = answers.count(401)
    assert set(answers) == {401, 429}
    assert answers.count(429) >= 10  # the loop ran far faster than it was answered
    assert checked <= 3 + int(elapsed / 1.0) + 1  # free guesses + one per backoff second


def test_the_throttle_is_shared_by_replicas_through_the_database(
    env: None, store: Store, accounts: Accounts
) -> None:
    """Failures on one replica's operator login throttle the other's (two apps, one store)."""
    first = TestClient(create_app(runtime=_runtime(store, **_throttled_config())))
    second = TestClient(create_app(runtime=_runtime(store, **_throttled_config())))
    for _ in range(3):
        token = csrf_of(first.get(f"{PREFIX}/login").text)
        wrong = first.post(
            f"{PREFIX}/login", data={"csrf": token, "username": "olga", "password": "guess"}
        )
        assert wrong.status_code == 401
    token = csrf_of(second.get(f"{PREFIX}/login").text)
    refused = second.post(
        f"{PREFIX}/login", data={"csrf": token, "username": "olga", "password": PASSWORDS["olga"]}
    )
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "too many failed logins" in refused.text
    time.sleep(1.1)
    operator_login(second)  # after the backoff, the right password works
    assert "operator.login_throttled" in audit(store)


def test_many_accounts_from_one_address_throttle_that_address_only(
    env: None, store: Store, accounts: Accounts
) -> None:
    app = create_app(
        runtime=_runtime(store, **_throttled_config(client_free_failures=4, login_free_failures=50))
    )
    with (
        TestClient(app, client=("198.51.100.7", 1)) as sprayer,
        TestClient(app, client=("198.51.100.8", 1)) as neighbour,
    ):
        answers = [
            sprayer.post("/login", data={"username": f"user{i}", "password": "x"}).status_code
            for i in range(6)
        ]
        assert answers[:4] == [401] * 4 and answers[4] == 429
        chat_login(neighbour, "alice")


# -- users and keys ----------------------------------------------------------------------


def _cli(store: Store, *args: str, stdin: str | None = None) -> Any:
    result = CliRunner().invoke(
        cli,
        [*args, "--database-url", store.url, "--config", str(ROOT / "flywheel.toml")],
        input=stdin,
    )
    assert result.exit_code == 0, result.output
    return result


def test_a_password_change_or_removal_ends_the_users_sessions(
    server: TestClient, store: Store
) -> None:
    _cli(store, "users", "add", "carol", "--attr", "plan=pro", "--password-stdin",
         stdin="carol-password\n")  # fmt: skip
    chat_login(server, "carol", "carol-password")
    assert server.get("/user").json()["metadata"]["plan"] == "pro"
    time.sleep(1.1)  # a session issued in an earlier second than the change
    _cli(store, "users", "passwd", "carol", "--password-stdin", stdin="carol-new-password\n")
    ended = server.get("/user")
    assert ended.status_code == 401 and "session has ended" in ended.json()["detail"]
    assert (
        server.post("/login", data={"username": "carol", "password": "carol-password"}).status_code
        == 401
    )
    chat_login(server, "carol", "carol-new-password")
    assert server.get("/user").status_code == 200
    time.sleep(1.1)
    _cli(store, "users", "remove", "carol")
    assert server.get("/user").status_code == 401
    assert (
        server.post(
            "/login", data={"username": "carol", "password": "carol-new-password"}
        ).status_code
        == 401
    )


def test_a_password_change_ends_operator_sessions(server: TestClient, store: Store) -> None:
    operator_login(server)
    assert server.get(f"{PREFIX}/report.json").status_code == 200
    time.sleep(1.1)
    _cli(store, "users", "passwd", "olga", "--password-stdin", stdin="olga-new-password\n")
    assert server.get(f"{PREFIX}/report.json").status_code == 401
    page = server.get(PREFIX)
    assert page.url.path == f"{PREFIX}/login"


def test_named_keys_are_shown_once_used_and_revoked_without_restart(
    server: TestClient, store: Store
) -> None:
    out = _cli(store, "keys", "create", "crm", "--json").output
    key = re.search(r'"key": "([^"]+)"', out)
    assert key is not None
    body = {"idempotency_key": "k1", "user_id": "u1", "name": "conversion", "value": 1}
    ok = server.post("/api/outcomes", json=body, headers={"X-API-Key": key.group(1)})
    assert ok.status_code == 201, ok.text
    listed = _cli(store, "keys", "list", "--json").output
    assert '"last_used_at": null' not in listed and key.group(1) not in listed
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(schema.api_keys.c.key_hash)).scalar()
    assert stored != key.group(1) and key.group(1) not in str(stored)
    _cli(store, "keys", "revoke", "crm")
    refused = server.post(
        "/api/outcomes", json={**body, "idempotency_key": "k2"}, headers={"X-API-Key": key.group(1)}
    )
    assert refused.status_code == 401
    legacy = server.post(
        "/api/outcomes",
        json={**body, "idempotency_key": "k3"},
        headers={"X-API-Key": "legacy-env-key"},
    )
    assert legacy.status_code == 201


# -- behind a load balancer ----------------------------------------------------------------


def test_cookies_are_secure_behind_a_trusted_tls_proxy(
    env: None, store: Store, accounts: Accounts
) -> None:
    app = create_app(runtime=_runtime(store, trusted_proxies=("10.0.0.0/8",)))
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    with TestClient(app, client=("10.0.0.5", 1), headers=forwarded) as behind_lb:
        chat = behind_lb.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
        assert "secure" in chat.headers["set-cookie"].lower()
        login_page = behind_lb.get(f"{PREFIX}/login")
        assert "secure" in login_page.headers["set-cookie"].lower()
    with TestClient(app, client=("198.51.100.9", 1), headers=forwarded) as spoofing:
        chat = spoofing.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
        assert "secure" not in chat.headers["set-cookie"].lower()  # untrusted: https not believed


def test_throttling_counts_the_real_client_behind_a_proxy(
    env: None, store: Store, accounts: Accounts
) -> None:
    app = create_app(
        runtime=_runtime(
            store,
            trusted_proxies=("10.0.0.0/8",),
            **_throttled_config(client_free_failures=3, login_free_failures=50),
        )
    )
    with TestClient(app, client=("10.0.0.5", 1)) as lb:
        for i in range(3):
            lb.post(
                "/login",
                data={"username": f"x{i}", "password": "x"},
                headers={"X-Forwarded-For": "203.0.113.7"},
            )
        attacker = lb.post(
            "/login",
            data={"username": "alice", "password": "x"},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert attacker.status_code == 429 and "address" in attacker.json()["detail"]
        other = lb.post(
            "/login",
            data={"username": "alice", "password": PASSWORDS["alice"]},
            headers={"X-Forwarded-For": "203.0.113.8"},
        )
        assert other.status_code == 200  # the proxy's own address was never blamed
    with TestClient(app, client=("198.51.100.9", 1)) as direct:
        for i in range(3):  # an untrusted peer cannot pick the address that gets blamed
            direct.post(
                "/login",
                data={"username": f"y{i}", "password": "x"},
                headers={"X-Forwarded-For": "203.0.113.99"},
            )
        blamed = direct.post("/login", data={"username": "z", "password": "x"})
        assert blamed.status_code == 429


# -- sessions, CSRF, roles -----------------------------------------------------------------


def test_a_planted_chat_session_cookie_is_refused_and_replaced_at_login(
    server: TestClient,
) -> None:
    server.cookies.set("access_token", "attacker-chosen-value")
    assert server.get("/user").status_code == 401
    token = chat_login(server, "alice")
    assert token != "attacker-chosen-value"
    assert server.get("/user").json()["identifier"] == "alice"


def test_a_pre_login_operator_session_is_worth_nothing_after_login(
    server: TestClient, store: Store
) -> None:
    before = server.get(f"{PREFIX}/login")
    planted_cookie, planted_csrf = before.cookies[COOKIE_NAME], csrf_of(before.text)
    operator_login(server)
    assert server.cookies[COOKIE_NAME] != planted_cookie
    response = server.post(f"{PREFIX}/optimize", data={"csrf": planted_csrf})
    assert response.status_code == 403
    assert "optimizer.run" not in audit(store)


def _operator_posts(store: Store) -> set[str]:
    router = create_router(_runtime(store), secret=b"any")
    return {
        route.path
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }


def test_every_operator_action_needs_the_csrf_token(server: TestClient, store: Store) -> None:
    targets = {
        f"{PREFIX}/login": f"{PREFIX}/login",
        f"{PREFIX}/logout": f"{PREFIX}/logout",
        f"{PREFIX}/optimize": f"{PREFIX}/optimize",
        f"{PREFIX}/variants": f"{PREFIX}/variants",
        f"{PREFIX}/outcomes/reattribute": f"{PREFIX}/outcomes/reattribute",
        f"{PREFIX}/arms/{{arm_id:path}}/{{action}}": [
            f"{PREFIX}/arms/concise/{action}" for action in ARM_ACTIONS
        ],
        f"{PREFIX}/examples/{{example_id}}/{{decision}}": [
            f"{PREFIX}/examples/ex-1/approve",
            f"{PREFIX}/examples/ex-1/reject",
        ],
        f"{PREFIX}/candidates/{{candidate_id}}/{{decision}}": [
            f"{PREFIX}/candidates/c-1/approve",
            f"{PREFIX}/candidates/c-1/decline",
        ],
    }
    assert _operator_posts(store) == set(targets), "a new operator action needs a CSRF test"
    operator_login(server)
    before = audit(store)
    for urls in targets.values():
        for url in [urls] if isinstance(urls, str) else urls:
            for form in ({}, {"csrf": "forged"}, {"csrf": ""}):
                response = server.post(url, data={**form, "cap": "10"})
                assert response.status_code == 403, (url, form, response.status_code)
    assert audit(store) == before


def test_an_operator_action_with_a_chat_users_session_is_refused(
    server: TestClient, store: Store
) -> None:
    chat_login(server, "alice")  # a real chat session cookie
    token = csrf_of(server.get(f"{PREFIX}/login").text)
    as_user = server.post(
        f"{PREFIX}/login", data={"csrf": token, "username": "alice", "password": PASSWORDS["alice"]}
    )
    assert as_user.status_code == 403
    for url in (f"{PREFIX}/optimize", f"{PREFIX}/arms/concise/pause"):
        assert server.post(url, data={"csrf": token}).status_code == 401
    assert server.get(f"{PREFIX}/report.json").status_code == 401
    # Even a validly signed operator cookie that says role "user" opens nothing.
    forged = SessionSigner(AUTH_SECRET.encode()).dumps(
        OperatorSession(csrf="c", user="alice", role="user", iat=time.time())
    )
    server.cookies.set(COOKIE_NAME, forged, path=PREFIX)
    assert server.post(f"{PREFIX}/optimize", data={"csrf": "c"}).status_code == 401
    assert "optimizer.run" not in audit(store)


def test_another_users_thread_is_refused_through_chainlits_thread_routes(
    server: TestClient, store: Store
) -> None:
    from datetime import UTC, datetime

    with store.engine.begin() as conn:
        conn.execute(
            schema.threads.insert().values(
                id="alice-thread",
                user_identifier="alice",
                name="my refund and address",
                metadata={},
                tags=[],
                created_at=datetime.now(UTC),
            )
        )
    chat_login(server, "bob")
    assert server.get("/project/thread/alice-thread").status_code in (401, 403, 404)
    assert server.get("/project/thread/alice-thread/element/e1").status_code in (401, 403, 404)
    assert server.get("/project/share/alice-thread").status_code == 404
    rename = server.put("/project/thread", json={"threadId": "alice-thread", "name": "pwned"})
    assert rename.status_code in (401, 403, 404)
    delete = server.request("DELETE", "/project/thread", json={"threadId": "alice-thread"})
    assert delete.status_code in (401, 403, 404)
    listed = server.post(
        "/project/threads", json={"pagination": {"first": 20}, "filter": {"userId": "alice"}}
    )
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["data"]] == []
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(schema.threads.c.name, schema.threads.c.deleted_at).where(
                schema.threads.c.id == "alice-thread"
            )
        ).one()
    assert tuple(row) == ("my refund and address", None)
    chat_login(server, "alice")
    assert server.get("/project/thread/alice-thread").status_code == 200


def test_origins_and_proxies_come_from_the_environment_and_are_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from optimizer.config import load_config

    monkeypatch.setenv("FLYWHEEL_ALLOWED_ORIGINS", "https://a.example, https://b.example:8443")
    monkeypatch.setenv("FLYWHEEL_TRUSTED_PROXIES", "10.0.0.0/8,192.0.2.1")
    security = load_config(tmp_path / "none.toml").security
    assert security.allowed_origins == ("https://a.example", "https://b.example:8443")
    assert security.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    monkeypatch.setenv("FLYWHEEL_TRUSTED_PROXIES", "the-load-balancer")
    with pytest.raises(ConfigError, match="IP addresses or networks"):
        load_config(tmp_path / "none.toml")


def test_the_public_host_behind_a_trusted_proxy_is_same_origin(
    env: None, store: Store, accounts: Accounts
) -> None:
    app = create_app(runtime=_runtime(store, trusted_proxies=("10.0.0.0/8",)))
    public = {
        "Origin": "https://chat.example.com",
        "X-Forwarded-Host": "chat.example.com",
        "X-Forwarded-Proto": "https",
    }
    form = {"username": "alice", "password": PASSWORDS["alice"]}
    with TestClient(app, client=("10.0.0.5", 1)) as behind_lb:
        assert behind_lb.post("/login", data=form, headers=public).status_code == 200
    with TestClient(app, client=("198.51.100.9", 1)) as spoofing:
        assert spoofing.post("/login", data=form, headers=public).status_code == 403


def test_a_flood_posted_to_login_is_not_buffered(server: TestClient) -> None:
    response = server.post(
        "/login", content=b"username=alice&password=" + b"x" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status_code == 413
