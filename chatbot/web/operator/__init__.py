"""The operator dashboard at ``/operator``: see the experiment, trust it, act on it.

``create_app`` mounts it with ``app.include_router(create_router(runtime))``.
"""

from __future__ import annotations

from chatbot.web.operator.routes import PREFIX, create_router

__all__ = ["PREFIX", "create_router"]
