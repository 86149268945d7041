"""`flask --app whisper_flask models ...` provisions checkpoints; `keys ...` manages API keys."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from whisper_flask.access.control import NO_ACTIVE_KEY
from whisper_flask.engine.checkpoints import CheckpointError, ensure_checkpoint, installed_models
from whisper_flask.exceptions import ApiKeyError
from whisper_flask.extension import get_service

models_cli = AppGroup("models", help="Provision Whisper checkpoints into MODEL_DIR.")


@models_cli.command("list")
def list_models() -> None:
    """Each model name and whether it is ready, convertible from a pack, or download-only."""
    model_dir = get_service().settings.MODEL_DIR
    click.echo(f"MODEL_DIR: {model_dir}")
    for name, state in installed_models(model_dir):
        click.echo(f"{name:<20} {state}")


@models_cli.command("fetch")
@click.argument("name", required=False)
def fetch_model(name: str | None) -> None:
    """Download or convert NAME (default: the configured model) into MODEL_DIR."""
    settings = get_service().settings
    try:
        path = ensure_checkpoint(name or settings.MODEL, settings.MODEL_DIR, settings.MODEL_DOWNLOAD)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name or settings.MODEL}: {path}")


keys_cli = AppGroup("keys", help="Manage API keys (README, API keys). A key is shown once, when it is made.")


@keys_cli.command("create")
@click.option("--name", required=True, help="a unique name: letters, digits, '-', '_' or '.'")
@click.option("--admin", is_flag=True, help="the key sees and manages every key's jobs")
def create_key(name: str, admin: bool) -> None:
    """Make a key and print it; only its hash is kept, so copy it now."""
    try:
        secret = get_service().create_key(name, admin=admin)
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)


@keys_cli.command("init")
def init_key() -> None:
    """Make and print an admin key if no key was ever made (the installer's first key); warn if none works."""
    service = get_service()
    secret = service.ensure_first_key()
    if secret is not None:
        click.echo(secret)
    elif service.locked_out():
        click.echo(NO_ACTIVE_KEY, err=True)


@keys_cli.command("list")
def list_keys() -> None:
    """Each key's name, role, dates and job count; never the key itself."""
    service = get_service()
    jobs = service.jobs_per_key()
    click.echo(f"{'NAME':<24} {'ROLE':<6} {'CREATED':<30} {'LAST USED':<30} {'JOBS':>6}  REVOKED")
    for key in service.keys():
        role = "admin" if key.admin else "user"
        click.echo(
            f"{key.name:<24} {role:<6} {key.created_at:<30} {key.last_used_at or '-':<30} "
            f"{jobs.get(key.name, 0):>6}  {key.revoked_at or '-'}"
        )


@keys_cli.command("revoke")
@click.argument("name")
def revoke_key(name: str) -> None:
    """Stop a key from working, at once; its jobs stay (admins still see them)."""
    try:
        get_service().revoke_key(name)
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {name}")
