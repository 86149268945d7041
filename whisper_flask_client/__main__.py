"""`python -m whisper_flask_client` is the `whisper-flask` command."""

from __future__ import annotations

from whisper_flask_client.cli import main

raise SystemExit(main())
