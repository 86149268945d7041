"""Who may do what: API keys hashed at rest, the failed-key throttle, signed links and webhook secrets.

May import jobs (the key table lives in the job database), engine, audio and the shared modules.
"""
