"""The monitoring stack of deploy/monitoring/ against real tools (docs/monitoring.md).

Static checks with Prometheus's own `promtool` (the scrape config, the alert rules and their
unit tests, which fire each alert at and just below its threshold), and a structural lint of
the Grafana files and compose.yaml (no Docker engine here). Then a real Prometheus server
(Debian's `prometheus`, started on a free loopback port with its storage in a temporary
folder, stopped after the module) scrapes a real `modelhost serve` every second, with the
repository's own scrape config and an admin key as bearer, and the tests ask it through its
HTTP API: the gateway is up, the modelhost_* series exist, the request counts match what was
sent, every PromQL expression of the dashboard and of the alert rules evaluates without
error, every panel whose metrics the gateway exposes shows data, a wrong key is refused, and
deploy/monitoring/preview.py draws every panel.

Skipped, with the reason, when `prometheus`/`promtool` are not installed (scripts/check
installs Debian's package), and the live tests while the gateway answers 404 on /metrics.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelhost.workers.process import free_port
from tests.conftest import Gateway, GatewayFactory, fake_model, openai_client, wait_for

MONITORING = Path(__file__).parent.parent / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "modelhost.json"
KEY = "monitoring-admin-key-0123456789"
MODEL = "fake"
BROKEN = "broken"  # its worker exits at start: restarted, then failed; its requests get 5xx
# Grafana's variables, replaced by what "All" and a short range would give.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m",
             "$model": ".*", "$instance": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian's `prometheus` package; "
                    "scripts/check installs it)")
    return path


def run_tool(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(MONITORING / "alerts.yml")["groups"]
            for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def scrape_config(folder: Path, target: str, key: str, name: str = "modelhost"
                  ) -> dict[str, Any]:
    """The repository's scrape job, aimed at `target` with `key` in a credentials file."""
    job: dict[str, Any] = dict(load_yaml(MONITORING / "prometheus.yml")["scrape_configs"][0])
    key_file = folder / f"{name}.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    job.update(job_name=name, static_configs=[{"targets": [target]}],
               authorization={**job["authorization"], "credentials_file": str(key_file)})
    return job


# ---------------------------------------------------------------- promtool


def test_promtool_check_config(tmp_path: Path) -> None:
    """The scrape config as shipped (its key file put next to it, as the docs say)."""
    promtool = tool("promtool")
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "modelhost_admin_key").write_text(KEY + "\n")
    output = run_tool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in output


def test_promtool_check_rules() -> None:
    output = run_tool(tool("promtool"), "check", "rules", str(MONITORING / "alerts.yml"))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_test_rules() -> None:
    output = run_tool(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=MONITORING)
    assert "SUCCESS" in output


def test_every_alert_is_complete_and_unit_tested() -> None:
    """Each rule waits (`for:`), has a severity and tells what it means and what to do, and
    the unit tests make it fire (and, in the same cases, stay silent just below its
    threshold: alerts.test.yml)."""
    tests = load_yaml(MONITORING / "alerts.test.yml")["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    docs = (MONITORING.parent.parent / "docs" / "monitoring.md").read_text()
    for rule in alert_rules():
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), name
        assert f"`{name}`" in docs, f"{name} is not explained in docs/monitoring.md"


def test_alert_thresholds_are_the_operations_ones() -> None:
    """GPU memory 85/95 %, latency 5/10 s, error rate 1/5 % (the operations rules)."""
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    assert exprs["ModelhostGpuMemoryHigh"].endswith(">= 0.85")
    assert exprs["ModelhostGpuMemoryCritical"].endswith(">= 0.95")
    assert exprs["ModelhostLatencyHigh"].endswith(">= 5")
    assert exprs["ModelhostLatencyCritical"].endswith(">= 10")
    assert exprs["ModelhostErrorRateHigh"].endswith(">= 0.01")
    assert exprs["ModelhostErrorRateCritical"].endswith(">= 0.05")


# ---------------------------------------------------------------- Grafana and compose files


def test_dashboard_and_provisioning_fit_together() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = load_yaml(MONITORING / "grafana/provisioning/datasources/prometheus.yml")
    provider = load_yaml(MONITORING / "grafana/provisioning/dashboards/modelhost.yml")
    uid = datasource["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == uid
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # The compose file mounts the dashboards where the provider reads them, and Grafana's
    # datasource reaches Prometheus where compose makes it listen.
    compose = load_yaml(MONITORING / "compose.yaml")["services"]
    mounts = volumes(compose["grafana"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    listen = [a for a in compose["prometheus"]["command"] if a.startswith("--web.listen")]
    assert listen == [f"--web.listen-address={datasource['datasources'][0]['url'][7:]}"]


def test_compose_mounts_what_prometheus_reads() -> None:
    compose = load_yaml(MONITORING / "compose.yaml")["services"]["prometheus"]
    mounts = volumes(compose)
    config_path = mounts["./prometheus.yml"]
    assert f"--config.file={config_path}" in compose["command"]
    config = load_yaml(MONITORING / "prometheus.yml")
    folder = str(Path(config_path).parent)
    for rule_file in config["rule_files"]:
        assert mounts[f"./{rule_file}"] == f"{folder}/{rule_file}"
    key = config["scrape_configs"][0]["authorization"]["credentials_file"]
    assert mounts[f"./{key}"] == f"{folder}/{key}"
    for host_path in mounts:
        assert host_path.startswith("./secrets/") or (MONITORING / host_path).exists()


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts, host path (relative to compose.yaml) -> container
    path; named volumes left out."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[source] = target
    return mounts


# ---------------------------------------------------------------- a real Prometheus


@dataclass
class Stack:
    gateway: Gateway
    url: str  # Prometheus, http://127.0.0.1:<port>

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def start_prometheus(folder: Path, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    binary = tool("prometheus")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_for(ready, timeout=30, interval=0.2)
    if proc.poll() is not None or not ready():
        proc.kill()
        raise RuntimeError(f"prometheus did not start:\n{(folder / 'prometheus.log').read_text()}")
    return proc, url


@pytest.fixture(scope="module")
def stack(module_gateway_factory: GatewayFactory,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tool("prometheus")
    gateway = module_gateway_factory(
        [fake_model(MODEL), fake_model(BROKEN, None, "--exit-at-start", "1", max_restarts=1)],
        env={"MODELHOST_ADMIN_KEYS": KEY})
    metrics = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10)
    if metrics.status_code == 404:
        pytest.skip("the gateway has no /metrics yet (GET /metrics answers 404)")
    assert metrics.status_code == 200, metrics.text
    folder = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{gateway.port}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [scrape_config(folder, target, KEY),
                           scrape_config(folder, target, "not-the-key", "wrong-key")],
    }
    proc, url = start_prometheus(folder, config)
    try:
        stack = Stack(gateway, url)
        assert wait_for(lambda: stack.value('up{job="modelhost"}') == 1, timeout=30), \
            (folder / "prometheus.log").read_text()
        # Then some traffic (after a first scrape, so that every counter is seen rising).
        with openai_client(gateway, api_key=KEY) as client:
            for _ in range(3):
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}])
            for _chunk in client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
        # The broken model's 5xx, each seen by Prometheus before the next (its counters exist
        # at 0 from the start, so even the first is an increase).
        body = {"model": BROKEN, "messages": [{"role": "user", "content": "hi"}]}
        for n in range(3):
            resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"})
            assert resp.status_code >= 500, resp.text
            counted = f'sum(modelhost_requests_total{{model="{BROKEN}"}}) == {n + 1}'
            assert wait_for(lambda e=counted: stack.query(e), timeout=10)
        yield stack
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_gateway_with_the_admin_key(stack: Stack) -> None:
    assert stack.value('up{job="modelhost"}') == 1
    assert stack.value('modelhost_up{job="modelhost"}') == 1
    names = {r["metric"]["__name__"]
             for r in stack.query('{job="modelhost", __name__=~"modelhost_.+"}')}
    # The scrape-time series of every configured model (docs/monitoring.md).
    for name in ("modelhost_model_state", "modelhost_queue_depth", "modelhost_queue_limit",
                 "modelhost_requests_in_flight", "modelhost_model_restarts_total"):
        assert name in names, sorted(names)
    assert stack.value(f'modelhost_model_state{{model="{MODEL}", state="ready"}}') == 1
    failed = f'modelhost_model_state{{model="{BROKEN}", state="failed"}}'
    assert wait_for(lambda: stack.value(failed) == 1, timeout=10)
    assert stack.value(f'sum(modelhost_model_state{{model="{MODEL}"}})') == 1


def test_a_wrong_key_is_refused(stack: Stack) -> None:
    """The same scrape with a key that is no admin key: the gateway refuses it."""
    assert wait_for(lambda: stack.value('up{job="wrong-key"}') == 0, timeout=10)
    targets = httpx.get(stack.url + "/api/v1/targets", timeout=10).json()["data"]
    wrong = [t for t in targets["activeTargets"] if t["labels"]["job"] == "wrong-key"]
    assert wrong and "401" in wrong[0]["lastError"], wrong


def test_no_gpu_series_without_a_gpu(stack: Stack) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: the GPU series may exist")
    assert stack.query('{__name__=~"modelhost_gpu_.+"}') == []


def test_every_dashboard_expression_evaluates(stack: Stack) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        stack.query(substitute(expr))


def test_dashboard_variables_have_values(stack: Stack) -> None:
    """`label_values(selector, label)` as Grafana asks it: the series API."""
    dashboard = json.loads(DASHBOARD.read_text())
    expected = {"instance": f"127.0.0.1:{stack.gateway.port}", "model": MODEL}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable
        selector, label = substitute(match[1]), match[2]
        resp = httpx.get(stack.url + "/api/v1/series", params={"match[]": selector},
                         timeout=10).json()
        assert resp["status"] == "success", resp
        assert expected[variable["name"]] in {s.get(label) for s in resp["data"]}, resp


# Panels that may rightly be empty on a healthy gateway that served a few requests: no
# failure yet, no download, no rejection, no GPU (the metric names alone are there).
MAY_BE_EMPTY = {"Since last failure", "Download progress",
                "Rejections per second by reason"}


def test_dashboard_panels_show_the_gateways_data(stack: Stack) -> None:
    """Every panel whose metrics the gateway exposes shows at least one series (its rates
    once Prometheus has two samples), so a wrong label or name in a panel is caught."""
    exposed = {r["metric"]["__name__"] for r in stack.query('{job="modelhost"}')}
    checked = []
    for panel in dashboard_panels():
        names = set(re.findall(r"\b(modelhost_\w+?)(?:_bucket)?\b", " ".join(
            t["expr"] for t in panel["targets"])))
        names = {n if n in exposed else n + "_bucket" for n in names}
        if panel["title"] in MAY_BE_EMPTY or not names <= exposed:
            continue
        checked.append(panel["title"])
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            assert wait_for(lambda e=expr: stack.query(e), timeout=10), (panel["title"], expr)
    assert {"Requests per second by model and route", "5xx share by model",
            "Request duration percentiles",
            "Gateway overhead percentiles by route", "Time to first token",
            "In flight and queued", "Model states", "Gateway up"} <= set(checked), checked


def test_every_alert_expression_evaluates(stack: Stack) -> None:
    for rule in alert_rules():
        stack.query(rule["expr"])
    # Prometheus evaluates the rules itself (every second here): all healthy.

    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(stack.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    assert wait_for(lambda: all(r["lastEvaluation"][:4] != "0001" for r in evaluated()),
                    timeout=15)
    rules = evaluated()
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", rule

def test_alerts_fire_from_the_gateways_own_series(stack: Stack) -> None:
    """The broken model's restarts fire ModelhostWorkerRestarting (no `for:`), and its state
    and 5xx answers make ModelhostModelFailed and the error-rate alerts pending or firing:
    the rules match the labels the gateway really writes. Nothing is about the healthy
    model or the gateway."""
    def active() -> dict[str, set[str]]:
        alerts = httpx.get(stack.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        found: dict[str, set[str]] = {}
        for alert in alerts:
            found.setdefault(alert["labels"]["alertname"], set()).add(
                alert["labels"].get("model", "") + ":" + alert["state"])
        return found

    expected = {"ModelhostWorkerRestarting": {f"{BROKEN}:firing"},
                "ModelhostModelFailed": {f"{BROKEN}:pending", f"{BROKEN}:firing"},
                "ModelhostErrorRateHigh": {f"{BROKEN}:pending", f"{BROKEN}:firing"},
                "ModelhostErrorRateCritical": {f"{BROKEN}:pending", f"{BROKEN}:firing"}}

    def all_there() -> bool:
        found = active()
        return all(found.get(name, set()) & states for name, states in expected.items())

    assert wait_for(all_there, timeout=20), active()
    for name, states in active().items():
        assert not any(s.startswith(f"{MODEL}:") for s in states), (name, states)
        assert name != "ModelhostGatewayDown", states


def test_request_counts_match_what_was_sent(stack: Stack) -> None:
    """The fixture sent 4 chat requests, one streamed (per-request metrics of the serving
    layer)."""
    expr = f'sum(modelhost_requests_total{{model="{MODEL}", route="chat", status="2xx"}})'
    assert wait_for(lambda: stack.value(expr) == 4, timeout=10), stack.query(expr)
    hist = f'sum(modelhost_request_duration_seconds_count{{model="{MODEL}", route="chat"}})'
    assert stack.value(hist) == 4


def test_preview_draws_every_panel(stack: Stack) -> None:
    """deploy/monitoring/preview.py (the docs' picture) over the same Prometheus."""
    spec = importlib.util.spec_from_file_location("preview", MONITORING / "preview.py")
    assert spec is not None and spec.loader is not None
    preview = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preview)
    page = preview.render(stack.url, 2)
    for panel in dashboard_panels():
        assert html.escape(panel["title"]) in page
    assert "<polyline" in page
