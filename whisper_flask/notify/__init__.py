"""Telling people a job ended: webhooks and e-mail from the durable outbox the store fills.

May import access, jobs, audio (for checked URLs) and the shared modules (ARCHITECTURE.md, "Layers").
"""
