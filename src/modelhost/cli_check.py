"""`modelhost check`: audit a deployment's files before anything starts (docs/check.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from modelhost.checks.report import Outcome, Severity, render
from modelhost.checks.runner import run_check
from modelhost.errors import validation_message
from modelhost.settings import Settings

_FAIL_ON = {"error": {Severity.ERROR}, "warning": {Severity.ERROR, Severity.WARNING},
            "info": set(Severity)}


@click.command("check")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="Models file to check [env MODELHOST_CONFIG].")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default=None,
              help="Report form [default: text].")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info"]), default="error",
              show_default=True, help="Lowest severity that makes the exit status 1.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report to this file instead of standard output.")
def check(paths: tuple[Path, ...], config_file: Path | None, fmt: str | None,
          as_json: bool, fail_on: str, output: Path | None) -> None:
    """Audit compose files, Dockerfiles, .env files, the models file and the settings.

    With no PATH: the compose files, Dockerfiles and .env of the current folder, the models
    file (--config or MODELHOST_CONFIG) and the settings from the environment. Each finding
    has a rule id, a severity, the file and line, why it matters and the fix.

    Exit status: 0 when no error was found, 1 when one was (or a finding at --fail-on or
    above), 2 for a usage error (a path that does not exist).
    """
    if as_json and fmt not in (None, "json"):
        raise click.UsageError("--json and --format disagree")
    fmt = "json" if as_json else fmt or "text"
    try:
        settings = Settings.with_overrides(config_file=config_file)
    except ValidationError as exc:
        message, _ = validation_message(exc.errors(), whole="settings")
        raise click.ClickException(f"invalid settings: {message}") from None
    # The settings are judged when the deployment is this one (no path, or --config); their
    # model cache is where config.json files are looked for in any case.
    judged = not paths or config_file is not None
    models_file = config_file
    if models_file is None and not paths and settings.config_file is not None \
            and settings.config_file.is_file():
        models_file = settings.config_file
    report = run_check(list(paths), settings=settings if judged else None,
                       models_file=models_file, cache_dirs=[settings.model_cache_dir])
    # Colours on a terminal, unless NO_COLOR (no-color.org) says otherwise.
    color = fmt == "text" and output is None and sys.stdout.isatty() and \
        not os.environ.get("NO_COLOR")
    text = report.as_text(color=color) if fmt == "text" else render(report, fmt)
    if output is not None:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)
    failing = _FAIL_ON[fail_on]
    if any(f.severity in failing for f in report.findings if f.outcome is Outcome.FAILED):
        sys.exit(1)
