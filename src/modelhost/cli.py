"""The `modelhost` command. `serve` is the default."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from modelhost import __version__
from modelhost.cli_admin import register
from modelhost.config import ConfigError, json_schema, load_models_file
from modelhost.settings import Settings


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.with_overrides(**overrides)
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings:\n{exc}") from None


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="modelhost")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """modelhost: one OpenAI-compatible endpoint over supervised model workers.

    With no command, runs `modelhost serve`.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
@click.option("--host", help="Address to listen on [env API_HOST; default 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [env API_PORT; default 8000].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Models file (YAML) [env MODELHOST_CONFIG].")
@click.option("--log-level", help="critical, error, warning, info, debug, trace [env LOG_LEVEL].")
def serve(host: str | None = None, port: int | None = None, config_file: Path | None = None,
          log_level: str | None = None) -> None:
    """Serve the OpenAI-compatible API (the default command)."""
    import uvicorn

    from modelhost.app import build_app
    from modelhost.catalog import Catalog
    from modelhost.logs import setup_logging
    from modelhost.server import GatewayProtocol

    settings = _settings(api_host=host, api_port=port, config_file=config_file,
                         log_level=log_level)
    setup_logging(settings.log_level, settings.logs_path)
    try:
        catalog = Catalog.from_file(settings.config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    app = build_app(settings, catalog)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, http=GatewayProtocol,
                log_level=settings.log_level, log_config=None, access_log=settings.access_log,
                timeout_graceful_shutdown=int(settings.stop_timeout) + 5,
                proxy_headers=bool(settings.forwarded_allow_ips),
                forwarded_allow_ips=settings.forwarded_allow_ips or None, server_header=False)


@cli.group()
def config() -> None:
    """Validate a models file or print its JSON Schema."""


@config.command("validate")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def config_validate(path: Path) -> None:
    """Validate a models file; exit 1 with precise errors when it is invalid."""
    try:
        models_file = load_models_file(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"{path}: OK, {len(models_file.models)} model(s)")


@config.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the models file."""
    click.echo(json.dumps(json_schema(), indent=2))


register(cli)


def main() -> None:
    cli()
