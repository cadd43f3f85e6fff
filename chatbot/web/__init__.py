"""Everything served over HTTP: one FastAPI app (:mod:`chatbot.web.server`) with the
Chainlit chat (:mod:`chatbot.web.app`, its data layer and feedback routes), the
outcomes API, login and limits, and the operator dashboard (:mod:`chatbot.web.operator`).
"""
