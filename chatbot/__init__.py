"""Everything a person touches: the Chainlit app, LLM calls, Langfuse tracing, HTTP APIs."""

from __future__ import annotations

import os

# litellm fetches its model cost map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__: list[str] = []
