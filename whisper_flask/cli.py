"""`flask --app whisper_flask models list|fetch NAME`: provision checkpoints ahead of time."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from .checkpoints import CheckpointError, ensure_checkpoint, installed_models

models_cli = AppGroup("models", help="Provision Whisper checkpoints into MODEL_DIR.")


@models_cli.command("list")
def list_models() -> None:
    """Each model name and whether it is ready, convertible from a pack, or download-only."""
    model_dir = current_app.config["MODEL_DIR"]
    click.echo(f"MODEL_DIR: {model_dir}")
    for name, state in installed_models(model_dir):
        click.echo(f"{name:<20} {state}")


@models_cli.command("fetch")
@click.argument("name", required=False)
def fetch_model(name: str | None) -> None:
    """Download or convert NAME (default: the configured model) into MODEL_DIR."""
    config = current_app.config
    try:
        path = ensure_checkpoint(name or config["MODEL"], config["MODEL_DIR"], config["MODEL_DOWNLOAD"])
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name or config['MODEL']}: {path}")
