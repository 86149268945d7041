"""The model: loading, each job's transcribe loop, the one model thread."""
