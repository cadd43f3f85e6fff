"""The Langfuse mirror, laid out like the Langfuse SDK: credentials, ids, masking,
the background tracer, reward scores, score import and prompt sync.

Langfuse is optional and never on the chat's critical path; the store stays the truth.
"""
