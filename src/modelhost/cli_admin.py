"""CLI commands that drive a running gateway: models, downloads, GPUs, the hub token, the
audit log, usage.

They call the admin API with an admin key (`client.admin_key`): `MODELHOST_ADMIN_KEY`, else the
first of `MODELHOST_ADMIN_KEYS`, else the first of `OPENAI_API_KEYS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click

from modelhost.client import GatewayClient, GatewayError

P = ParamSpec("P")
R = TypeVar("R")

url_option = click.option("--url", envvar="MODELHOST_URL",
                          help="Gateway URL [env MODELHOST_URL; default http://API_HOST:API_PORT]. "
                               "The admin key sent is MODELHOST_ADMIN_KEY, else the first of "
                               "MODELHOST_ADMIN_KEYS, else the first of OPENAI_API_KEYS.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


def _gateway_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _gib(n: Any) -> str:
    return f"{int(n) / 2**30:.1f} GiB" if isinstance(n, int) else "-"


@click.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def models(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List the models of a running gateway (`ls`), or act on one."""
    ctx.obj = GatewayClient(url)
    if ctx.invoked_subcommand is None:
        ctx.invoke(ls, as_json=as_json)


@models.command()
@json_option
@click.pass_obj
@_gateway_errors
def ls(client: GatewayClient, as_json: bool) -> None:
    """List models with their states."""
    data = client.call("GET", "/api/admin/models")["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("ID", "TASK", "BACKEND", "STATE", "GPUS", "ALIASES")]
    rows += [(m["id"], m["task"], m["backend"], m["state"],
              ",".join(map(str, m["gpus"])) or "-", ",".join(m["aliases"])) for m in data]
    _table(rows)
    for m in data:
        if m.get("last_error") and m["state"] == "failed":
            click.echo(f"\n{m['id']}: {m['last_error']}", err=True)


@models.command()
@click.argument("model")
@click.option("--gpus", help="Comma-separated GPU indices to load on, e.g. 1,2.")
@click.option("--no-wait", is_flag=True, help="Return at once instead of waiting until ready.")
@json_option
@click.pass_obj
@_gateway_errors
def load(client: GatewayClient, model: str, gpus: str | None, no_wait: bool,
         as_json: bool) -> None:
    """Load MODEL (downloading it first when needed)."""
    try:
        body = {"gpu_device_ids": [int(g) for g in gpus.split(",")]} if gpus else None
    except ValueError:
        raise click.BadParameter(f"'{gpus}' is not a comma-separated list of GPU indices",
                                 param_hint="--gpus") from None
    card = client.call("POST", f"/api/admin/models/{model}/load", json=body,
                       params={"wait": str(not no_wait).lower()})
    _print_card(card, as_json)


@models.command()
@click.argument("model")
@json_option
@click.pass_obj
@_gateway_errors
def unload(client: GatewayClient, model: str, as_json: bool) -> None:
    """Stop MODEL's worker."""
    _print_card(client.call("POST", f"/api/admin/models/{model}/unload"), as_json)


@models.command()
@click.argument("model")
@click.option("--cancel", is_flag=True, help="Cancel a running download instead.")
@json_option
@click.pass_obj
@_gateway_errors
def download(client: GatewayClient, model: str, cancel: bool, as_json: bool) -> None:
    """Download MODEL into the cache, with a progress bar (resumes an interrupted one)."""
    if cancel:
        _print_card(client.call("DELETE", f"/api/admin/models/{model}/download"), as_json)
        return
    events = client.events()
    next(events)  # the snapshot: the subscription is live before the download starts
    card = client.call("POST", f"/api/admin/models/{model}/download")
    model_id = card["id"]
    if card["state"] in ("cached", "starting", "ready", "stopping"):
        _print_card(card, as_json)  # already downloaded: nothing was fetched
        return
    final = _follow_download(events, model_id, quiet=as_json)
    if as_json:
        click.echo(json.dumps(final, indent=2))
    if final.get("state") != "completed":
        raise click.ClickException(f"download {final.get('state')}: {final.get('error')}")


def _follow_download(events: Any, model_id: str, quiet: bool) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), disable=quiet,
                  transient=False) as progress:
        task = progress.add_task(model_id, total=None)
        for event in events:
            if event.get("type") != "download" or event.get("model") != model_id:
                continue
            progress.update(task, completed=event.get("bytes_done") or 0,
                            total=event.get("bytes_total") or None)
            if event.get("state") in ("completed", "failed", "cancelled"):
                return dict(event)
    return {"state": "unknown", "error": "the event stream ended"}


@models.command()
@click.argument("model")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@_gateway_errors
def rm(client: GatewayClient, model: str, yes: bool) -> None:
    """Delete MODEL's files from the cache (the model must be unloaded)."""
    if not yes:
        click.confirm(f"Delete the cached files of {model}?", abort=True)
    result = client.call("DELETE", f"/api/admin/models/{model}/cache")
    freed = result.get("freed_bytes") or 0
    click.echo(f"{model}: freed {_gib(freed) if freed >= 2**30 else f'{freed / 2**20:.1f} MiB'}")


@models.command()
@click.argument("model")
@click.option("--to", "version", type=click.IntRange(min=1),
              help="The version to go back to (`modelhost models history MODEL`); default: "
                   "the spec before the current one.")
@json_option
@click.pass_obj
@_gateway_errors
def rollback(client: GatewayClient, model: str, version: int | None, as_json: bool) -> None:
    """Serve an earlier spec of MODEL again, through a blue-green update (the new version
    is probed before it serves; a failure keeps the current one)."""
    card = client.call("POST", f"/api/admin/models/{model}/rollback",
                       json={"version": version})
    _print_card(card, as_json)


@models.command()
@click.argument("model")
@json_option
@click.pass_obj
@_gateway_errors
def history(client: GatewayClient, model: str, as_json: bool) -> None:
    """Every version of MODEL's spec: created, updated, rolled back (and why), deleted."""
    data = client.call("GET", f"/api/admin/models/{model}/history")["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("VERSION", "ACTION", "ACTOR", "AT", "REASON")]
    rows += [(str(h["version"]), h["action"], h["actor"], h["created_at"][:19] + "Z",
              h.get("reason") or "-") for h in data]
    _table(rows)


def _print_card(card: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    gpus = ",".join(map(str, card.get("gpus") or [])) or "cpu"
    click.echo(f"{card['id']}: {card['state']} ({gpus})")
    rollout = card.get("rollout") or {}
    if rollout.get("warning"):
        click.echo(f"warning: {rollout['warning']}", err=True)


@click.command()
@url_option
@json_option
@_gateway_errors
def gpus(url: str | None, as_json: bool) -> None:
    """GPUs of a running gateway with live memory, load and temperature."""
    data = GatewayClient(url).call("GET", "/api/admin/gpus")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data["available"]:
        click.echo(f"no GPU: {data['reason']}")
        return
    rows = [("GPU", "NAME", "MEMORY USED", "TOTAL", "UTIL", "TEMP", "POWER", "MODELS")]
    for g in data["gpus"]:
        rows.append((str(g["index"]), g["name"], _gib(g["memory_used"]), _gib(g["memory_total"]),
                     f"{g['utilization_gpu']}%" if g["utilization_gpu"] is not None else "-",
                     f"{g['temperature_c']}C" if g["temperature_c"] is not None else "-",
                     f"{g['power_w']:.0f}W" if g["power_w"] is not None else "-",
                     ",".join(g["models"]) or "-"))
    _table(rows)


@click.group()
@url_option
@click.pass_context
def token(ctx: click.Context, url: str | None) -> None:
    """The Hugging Face token used for downloads (never shown in full)."""
    ctx.obj = GatewayClient(url)


@token.command("set")
@click.option("--token", "value", prompt=True, hide_input=True,
              help="The token (prompted, hidden, when not given).")
@click.pass_obj
@_gateway_errors
def token_set(client: GatewayClient, value: str) -> None:
    """Store the token (MODEL_CACHE_DIR/.hf_token, mode 0600)."""
    result = client.call("PUT", "/api/admin/token", json={"token": value})
    click.echo(f"token set: {result['masked']}")


@token.command("show")
@click.pass_obj
@_gateway_errors
def token_show(client: GatewayClient) -> None:
    """Whether a token is set, where from, and its masked form."""
    result = client.call("GET", "/api/admin/token")
    click.echo(f"{result['source']}: {result['masked']}" if result["set"] else "no token")


@token.command("rm")
@click.pass_obj
@_gateway_errors
def token_rm(client: GatewayClient) -> None:
    """Delete the stored token."""
    client.call("DELETE", "/api/admin/token")
    click.echo("token deleted")


_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _moment(value: str | None, option: str) -> str | None:
    """An ISO 8601 time as is, or `30m`, `2h`, `7d` ago as one (UTC)."""
    if value is None:
        return None
    ago = _AGO.match(value.strip())
    if ago:
        delta = timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
        return (datetime.now(UTC) - delta).isoformat()
    try:
        datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is neither an ISO 8601 time "
                                 f"(2026-12-06T02:00:00Z) nor a duration ago (30m, 2h, 7d)",
                                 param_hint=option) from None
    return value.strip()


def _listing(url: str | None, path: str, as_json: bool, empty: str,
             since: str | None, until: str | None, **params: str | None) -> list[Any]:
    """The `data` of a GET listing (`--since`/`--until` read as times); printed as JSON with
    `--json`, or `empty` said when there is nothing: then the caller prints no table (the
    list it gets back is empty)."""
    query = {"since": _moment(since, "--since"), "until": _moment(until, "--until"), **params}
    data: list[Any] = GatewayClient(url).call(
        "GET", path, params={k: v for k, v in query.items() if v is not None})["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return []
    if not data:
        click.echo(empty)
    return data


@click.command()
@url_option
@click.option("--since", help="From this time: ISO 8601 (UTC when no offset), or 30m, 2h, 7d ago.")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--model", help="Only the actions on this model.")
@click.option("--actor", help="Only the actions of this key id (key-...; see docs/security.md).")
@click.option("--action", help="Only this action (model.load, token.set...).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="At most this many entries, newest first.")
@json_option
@_gateway_errors
def audit(url: str | None, since: str | None, until: str | None, model: str | None,
          actor: str | None, action: str | None, limit: int, as_json: bool) -> None:
    """The audit log of a running gateway: admin actions, newest first."""
    data = _listing(url, "/api/admin/audit", as_json, "no audit entries", since=since,
                    until=until, model=model, actor=actor, action=action, limit=str(limit))
    if not data:
        return
    rows = [("AT", "ACTOR", "CLIENT", "ACTION", "MODEL", "STATUS", "OUTCOME")]
    rows += [(e["at"][:19] + "Z", e["actor"], e["client"] or "-", e["action"],
              e["model"] or "-", str(e["status"]), e["outcome"]) for e in data]
    _table(rows)


@click.command()
@url_option
@click.option("--since", help="From this time: ISO 8601 (UTC when no offset), or 30m, 2h, 7d ago.")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--group-by", default="key,model", show_default=True,
              help="Any of key, model, and hour or day, comma-separated.")
@click.option("--key", help="Only this key id (key-...).")
@click.option("--model", help="Only this model.")
@json_option
@_gateway_errors
def usage(url: str | None, since: str | None, until: str | None, group_by: str,
          key: str | None, model: str | None, as_json: bool) -> None:
    """Usage of a running gateway by key id and model: requests, prompt and completion
    tokens, audio seconds, embedding inputs (hourly counts; a time range takes the hours
    that start in it)."""
    data = _listing(url, "/api/admin/usage", as_json, "no usage", since=since, until=until,
                    group_by=group_by, key=key, model=model)
    if not data:
        return
    columns = [c for c in ("start", "key_id", "model") if c in data[0]]
    rows = [(*(c.upper() for c in columns), "REQUESTS", "PROMPT", "COMPLETION", "AUDIO_S",
             "EMBED_INPUTS")]
    rows += [(*(str(u[c]) for c in columns), str(u["requests"]), str(u["prompt_tokens"]),
              str(u["completion_tokens"]), f"{u['audio_seconds']:.1f}",
              str(u["embedding_inputs"])) for u in data]
    _table(rows)


@click.command()
@url_option
@json_option
@_gateway_errors
def reload(url: str | None, as_json: bool) -> None:
    """Make a running gateway read its models file again (as SIGHUP does): an invalid file
    changes nothing; changed models are updated blue-green, new ones added, removed ones
    removed."""
    result = GatewayClient(url).call("POST", "/api/admin/reload")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for model_id in result["added"]:
        click.echo(f"{model_id}: added")
    for model_id in result["removed"]:
        click.echo(f"{model_id}: removed")
    for model_id, rollout in result["changed"].items():
        outcome = f"rolled back: {rollout['reason']}" if rollout["state"] == "rolled_back" \
            else f"updated ({rollout['mode']}, {rollout['state']})"
        click.echo(f"{model_id}: {outcome}")
        if rollout.get("warning"):
            click.echo(f"warning: {rollout['warning']}", err=True)
    click.echo(f"{len(result['unchanged'])} model(s) unchanged")
    if any(r["state"] == "rolled_back" for r in result["changed"].values()):
        raise click.exceptions.Exit(1)


def register(cli: click.Group) -> None:
    for command in (models, gpus, token, audit, usage, reload):
        cli.add_command(command)


