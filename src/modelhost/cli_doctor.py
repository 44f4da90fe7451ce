"""`modelhost doctor`: check the host the gateway will run on (docs/doctor.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from modelhost.errors import validation_message
from modelhost.settings import Settings

_FAIL_ON = {"error": ("error",), "warning": ("error", "warning"),
            "info": ("error", "warning", "info")}


@click.command("doctor")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Models file (YAML) [env MODELHOST_CONFIG].")
@click.option("--host", help="The API address to check [env API_HOST; default 127.0.0.1].")
@click.option("--port", type=int, help="The API port to check [env API_PORT; default 8000].")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]),
              default=None, help="Report form [default: text].")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info"]), default="error",
              show_default=True, help="Lowest severity of a failed check that makes the exit "
              "status 1.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report to this file instead of standard output.")
def doctor(config_file: Path | None, host: str | None, port: int | None, fmt: str | None,
           as_json: bool, fail_on: str, output: Path | None) -> None:
    """Check this host for the gateway: NVIDIA driver and CUDA, GPU memory and compute
    capability for the configured models, the container runtime, shared memory, disk space
    in the model cache, writable directories, the API port, the Hugging Face token.

    Exit status: 1 when a check failed with an error (or at --fail-on or above), else 0; 2
    for a usage error. Checks that cannot apply here (no GPU, not in a container) say so
    and do not fail.
    """
    from modelhost.checks.report import render
    from modelhost.doctor import diagnose

    if as_json and fmt not in (None, "json"):
        raise click.UsageError("--json and --format disagree")
    fmt = "json" if as_json else fmt or "text"
    try:
        settings = Settings.with_overrides(config_file=config_file, api_host=host,
                                           api_port=port)
    except ValidationError as exc:
        # What is wrong with each setting, never the value given (it may be a key).
        message, _ = validation_message(exc.errors(), whole="settings")
        raise click.ClickException(f"invalid settings: {message}") from None
    report = diagnose(settings)
    if fmt == "text":
        color = output is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        text = report.as_text(color=color)
    else:
        text = render(report, fmt)
    if output is not None:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)
    failing = _FAIL_ON[fail_on]
    sys.exit(1 if any(f.severity.value in failing for f in report.failed()) else 0)
