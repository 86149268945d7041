"""Jobs: records, the registry and its rules, the store and runner ports, the pipeline that runs one, their files.

May import engine, audio and the shared modules; knows nothing of keys, HTTP or notifications.
"""
