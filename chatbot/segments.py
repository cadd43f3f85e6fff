"""Where a chat user's segment comes from: the attributes of the configured logins.

``experiment.segment_by = ["plan"]`` allocates traffic per value of ``plan``;
the value is read here, on the server, from the login's ``attributes`` in
``flywheel.toml``, never from anything the browser sends::

    [[auth.users]]
    name = "acme-admin"
    password_hash = "$2b$12$..."
    attributes = { plan = "pro" }

A user without the attribute lands in the segment ``plan=`` (empty value),
which has an allocation of its own once it has sessions. The attributes are
read when the conversation starts, so a change in the file applies to the
user's next conversation (after a restart of the server that reads it).

>>> from optimizer.config import AuthConfig, Config, UserConfig
>>> config = Config(auth=AuthConfig(users=(UserConfig(name="ann", password_hash="x" * 20,
...                                                   attributes={"plan": "pro"}),)))
>>> user_attributes(config, "ann"), user_attributes(config, "bob")
({'plan': 'pro'}, {})
"""

from __future__ import annotations

from optimizer.config import Config

__all__ = ["user_attributes"]


def user_attributes(config: Config, name: str) -> dict[str, str]:
    """The configured attributes of login ``name`` (empty for demo or unknown logins)."""
    for user in config.auth.users:
        if user.name == name:
            return dict(user.attributes)
    return {}
