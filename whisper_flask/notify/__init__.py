"""Telling people a job ended: webhooks and e-mail from a durable outbox."""
