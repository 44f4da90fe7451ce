"""The `modelhost` command. `serve` is the default."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from modelhost import __version__
from modelhost.cli_admin import register
from modelhost.cli_check import check
from modelhost.cli_doctor import doctor
from modelhost.config import ConfigError, json_schema, load_models_file
from modelhost.errors import validation_message
from modelhost.settings import Settings, is_loopback


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.with_overrides(**overrides)
    except ValidationError as exc:
        # What is wrong with each setting, never the value given (it may be a key).
        message, _ = validation_message(exc.errors(), whole="settings")
        raise click.ClickException(f"invalid settings: {message}") from None


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
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve on a non-loopback address with no key configured (refused "
              "otherwise) [env MODELHOST_INSECURE_NO_AUTH].")
def serve(host: str | None = None, port: int | None = None, config_file: Path | None = None,
          log_level: str | None = None, insecure_no_auth: bool = False) -> None:
    """Serve the OpenAI-compatible API (the default command).

    SIGTERM or SIGINT starts a graceful stop: new requests get 503, those in flight
    (streams included) may finish for MODELHOST_DRAIN_TIMEOUT seconds, then the workers are
    stopped. A second signal stops at once.
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from modelhost.app import build_app
    from modelhost.catalog import Catalog
    from modelhost.logs import LogSetupError, setup_logging
    from modelhost.serving.protocol import GatewayProtocol
    from modelhost.serving.server import GatewayServer

    settings = _settings(api_host=host, api_port=port, config_file=config_file,
                         log_level=log_level, insecure_no_auth=insecure_no_auth or None)
    _refuse_exposed_without_keys(settings)
    try:
        setup_logging(settings)
    except LogSetupError as exc:
        raise click.ClickException(str(exc)) from None
    _open_files_for(settings.max_connections)
    try:
        catalog = Catalog.from_file(settings.config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    app = build_app(settings, catalog)
    config = uvicorn.Config(
        app, host=settings.api_host, port=settings.api_port, http=GatewayProtocol,
        log_level=settings.log_level, log_config=None, access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.stop_timeout) + 5,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None, server_header=False)
    server = GatewayServer(config, drain_timeout=settings.drain_timeout)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, raised again once stopped
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _open_files_for(connections: int) -> None:
    """Raise the soft limit on open files to what `connections` clients need (each may have a
    connection to a worker too, plus the gateway's own files), up to the hard limit: a
    gateway out of descriptors stops accepting before its connection cap answers 503."""
    needed = 2 * connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < needed:
        logging.getLogger(__name__).warning(
            "open files are limited to %d, short of the %d that MODELHOST_MAX_CONNECTIONS=%d "
            "may need: raise the limit (ulimit -n, systemd LimitNOFILE) or lower the setting",
            soft, needed, connections)


def _refuse_exposed_without_keys(settings: Settings) -> None:
    """No key at all is a single-user development server: loopback only, unless told."""
    if (settings.api_keys or settings.admin_api_keys or settings.insecure_no_auth
            or is_loopback(settings.api_host)):
        return
    raise click.ClickException(
        f"refusing to serve on {settings.api_host} with no key configured: anyone who can "
        "reach this address could use and change every model, and run what a models file "
        "may run. Set OPENAI_API_KEYS (inference keys) and MODELHOST_ADMIN_KEYS (admin "
        "keys), or listen on a loopback address (--host 127.0.0.1), or pass "
        "--insecure-no-auth (MODELHOST_INSECURE_NO_AUTH=1) to serve without keys anyway.")


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
cli.add_command(check)
cli.add_command(doctor)


def main() -> None:
    cli()
