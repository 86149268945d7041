"""Jobs: their records, the registry and store, the pipeline that runs one, their files."""
