"""The model: loading, each job's transcribe loop, the one model thread that batches every job's windows.

May import audio (decoded audio) and the shared modules; knows nothing of jobs, keys, HTTP or the store.
"""
