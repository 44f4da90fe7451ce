"""The report's view of the "modelhost (scraped)" arm: what being scraped by Prometheus costs
on the request path, side by side with the same gateway unscraped, and the goals both arms
are held to."""

from __future__ import annotations

from typing import Any

from .arms import SCRAPED
from .report_fmt import f, pct, table

BASE = "modelhost"
PROMETHEUS_S = 15.0  # the scrape interval of most Prometheus configurations
SHARED_CORES = 0.2  # other work past this (cores busy, on average): the page says so here


def _ratio(scraped: float | None, base: float | None, digits: int = 2) -> str:
    """scraped / unscraped; none where either is at or below zero (an added latency can be)."""
    if scraped is None or base is None or base <= 0 or scraped <= 0:
        return "-"
    return f"{scraped / base:.{digits}f}x"


def _interval(part: dict[str, Any] | None) -> str:
    """"1 s (harsher than ...)": the interval, and how it compares with Prometheus's."""
    every = ((part or {}).get("scrape") or {}).get("every_s")
    if not every:
        return "-"
    usual = PROMETHEUS_S
    return f"{every:g} s" + (f" (harsher than Prometheus's usual {usual:g} s)" if every < usual
                             else f" (Prometheus's usual is {usual:g} s)")


def _at_goal(overhead: dict[str, Any], name: str, rate: int) -> dict[str, Any] | None:
    added: dict[str, Any] | None = overhead["added"].get(name, {}).get(str(rate))
    return added


def scrape_goals(overhead: dict[str, Any] | None, rate: int, p50: float, p99: float
                 ) -> tuple[list[list[str]], list[str]]:
    """The goal rows of the scraped arm (the unscraped arm's are the page's first rows) and
    a line of reading comparing the two."""
    if not overhead or SCRAPED not in overhead["arms"]:
        if overhead and overhead.get("scrape") is None and "modelhost" in overhead["arms"]:
            return ([[f"added latency at {rate} req/s with /metrics scraped",
                      f"p50 ≤ {p50} ms, p99 ≤ {p99} ms",
                      "not in these results (run with --scrape 0, or before the arm existed)",
                      "-"]],
                    [])
        return [], []
    every = _interval(overhead)
    sc, mh = _at_goal(overhead, SCRAPED, rate), _at_goal(overhead, BASE, rate)
    if sc is None:
        return ([[f"added latency at {rate} req/s, /metrics scraped every {every}",
                  f"p50 ≤ {p50} ms, p99 ≤ {p99} ms", "not measured at this rate", "-"]], [])
    ok50, ok99 = sc["p50"] <= p50, sc["p99"] <= p99
    every = every.split(" (")[0]
    rows = [[f"added latency p50 at {rate} req/s, /metrics scraped every {every}",
             f"≤ {p50} ms", f"{sc['p50']:.3f} ms", "met" if ok50 else "**not met**"],
            [f"added latency p99 at {rate} req/s, /metrics scraped every {every}",
             f"≤ {p99} ms", f"{sc['p99']:.3f} ms", "met" if ok99 else "**not met**"]]
    cpu_sc = overhead["arms"][SCRAPED].get(str(rate), {}).get("cpu_s_per_1k")
    cpu_mh = overhead["arms"].get(BASE, {}).get(str(rate), {}).get("cpu_s_per_1k")
    scrape = overhead.get("scrape") or {}
    mh50, mh99 = (mh["p50"], mh["p99"]) if mh is not None else (None, None)
    met_mh = mh50 is not None and mh99 is not None and mh50 <= p50 and mh99 <= p99
    met_sc = ok50 and ok99
    reading = (
        f"Scraped every {every}, a second modelhost "
        f"otherwise identical adds {sc['p50']:.3f} ms at p50 and {sc['p99']:.3f} ms at p99 at "
        f"{rate} req/s, against {f(mh50, 3)} / {f(mh99, 3)} ms "
        f"unscraped (scraped / unscraped: p50 {_ratio(sc['p50'], mh50)}, p99 "
        f"{_ratio(sc['p99'], mh99)}), for {f(cpu_sc, 3)} CPU s per 1,000 "
        f"requests against {f(cpu_mh, 3)} ({_ratio(cpu_sc, cpu_mh)}). "
        + (f"Both arms meet the goals (p50 ≤ {p50} ms, p99 ≤ {p99} ms added)."
           if met_mh and met_sc else
           f"The goals (p50 ≤ {p50} ms, p99 ≤ {p99} ms added) are "
           f"{'met' if met_sc else '**not met**'} scraped and "
           f"{'met' if met_mh else '**not met**'} unscraped.")
        + (f" The overhead part made {scrape.get('scrapes', 0):,} scrapes of "
           f"{f(scrape.get('mean_bytes'), 0)} bytes on average, {f(scrape.get('mean_ms'))} ms "
           f"each." if scrape else "")
        + _expected(scrape, rate, cpu_mh))
    return rows, [reading]


def _expected(scrape: dict[str, Any], rate: int, cpu_base: float | None) -> str:
    """What the scrapes alone should cost per request, from the idle measure."""
    idle = scrape.get("idle") or {}
    per = idle.get("gateway_cpu_ms_per_scrape")
    every = scrape.get("every_s")
    if not per or not every:
        return ""
    per_1k = per / every / rate  # CPU s per 1,000 requests: ms/s over req/s
    share = f" ({per_1k / cpu_base:.0%} of the unscraped arm's)" if cpu_base else ""
    return (f" With nothing else to do, one scrape costs the gateway {per:.1f} ms of CPU: at "
            f"one every {every:g} s and {rate} req/s, that alone is {per_1k:.3f} CPU s per "
            f"1,000 requests{share}. It runs on the gateway's event loop, so about "
            f"{per / every / 10:.2g} % of the requests (those that arrive during a scrape) wait "
            f"up to {per:.0f} ms: past 1 % it shows in the p99.")


def _overhead_rows(overhead: dict[str, Any]) -> list[list[str]]:
    arms, added = overhead["arms"], overhead["added"]
    rows = []
    for rate in overhead["plan"]["rates"]:
        r = str(rate)
        mh, sc = arms.get(BASE, {}).get(r, {}), arms[SCRAPED].get(r, {})
        amh, asc = added.get(BASE, {}).get(r), added.get(SCRAPED, {}).get(r)
        if mh.get("skipped") or sc.get("skipped") or amh is None or asc is None:
            rows.append([f"{rate:,}"] + ["-"] * 9 + ["not run at this rate"])
            continue
        errors = (f"{sum(mh['errors'].values()):,} / {sum(sc['errors'].values()):,}")
        rows.append([f"{rate:,}",
                     f(amh["p50"], 3), f(asc["p50"], 3), _ratio(asc["p50"], amh["p50"]),
                     f(amh["p99"], 3), f(asc["p99"], 3), _ratio(asc["p99"], amh["p99"]),
                     f(mh["cpu_s_per_1k"], 3), f(sc["cpu_s_per_1k"], 3),
                     _ratio(sc["cpu_s_per_1k"], mh["cpu_s_per_1k"]), errors])
    return rows


def _streaming_rows(streaming: dict[str, Any]) -> list[list[str]]:
    paced, burst, ramp = streaming["paced"], streaming["burst"], streaming["ramp"]
    pm, ps = paced.get(BASE, {}), paced.get(SCRAPED, {})
    bm, bs = burst.get(BASE, {}), burst.get(SCRAPED, {})
    rows = []
    for q in ("p50", "p99"):
        a, b = (pm.get("added_ttft_ms") or {}).get(q), (ps.get("added_ttft_ms") or {}).get(q)
        rows.append([f"added time to first token {q} (ms)", f(a), f(b), _ratio(b, a)])
    a, b = (pm.get("gap_ms") or {}).get("p50"), (ps.get("gap_ms") or {}).get("p50")
    rows.append(["gap between chunks p50 (ms; upstream "
                 f"{streaming['plan']['paced_gap_ms']:g})", f(a), f(b), _ratio(b, a)])
    rows.append(["chunks bunched (< 1 ms)", pct(pm.get("gap_coalesced_fraction")),
                 pct(ps.get("gap_coalesced_fraction")), ""])
    a, b = bm.get("chunks_per_s"), bs.get("chunks_per_s")
    rows.append(["chunks per second, burst", f(a, 0), f(b, 0), _ratio(b, a)])
    a, b = bm.get("cpu_us_per_chunk"), bs.get("cpu_us_per_chunk")
    rows.append(["gateway CPU µs per chunk, burst", f(a, 1), f(b, 1), _ratio(b, a)])
    a, b = ramp.get(BASE, {}).get("held"), ramp.get(SCRAPED, {}).get("held")
    rows.append(["most concurrent streams held", f(a, 0), f(b, 0), ""])
    return rows


def scrape_section(overhead: dict[str, Any] | None, streaming: dict[str, Any] | None,
                   rate: int, p50: float, p99: float, other: float | None) -> str:
    """`other`: the cores that other work kept busy during the run, on average."""
    parts = [(name, data) for name, data in (("overhead", overhead), ("streaming", streaming))
             if data]
    if not parts:
        return ""
    if not any(data.get("scrape") for _, data in parts):
        return ("## What being scraped costs\n\nNot measured in this run (`--scrape 0`, or "
                "results from before the scraped arm existed).")
    every = next(_interval(data) for _, data in parts if data.get("scrape"))
    text = (
        f"## What being scraped costs\n\nThe **{SCRAPED}** arm is a second modelhost "
        f"gateway started exactly like the **{BASE}** arm (same configuration, same core, "
        f"same upstream), whose `/metrics` is fetched every {every} with the admin key "
        f"during each of its own steps (`bench/run --scrape S` sets the interval). The "
        f"scraper (`bench/scrape.py`) is a process of its own on the load generator's core, "
        f"with Prometheus's request headers and one keep-alive connection, so that a scrape "
        f"costs the gateway and not the load generator; it is off during the other arms' "
        f"steps, so that the gateway's work for a scrape is never charged to another gateway "
        f"on the same core. Both gateways do the same work per request (the metrics, request "
        f"ids and usage counting of the revision measured); only the scraping differs. The "
        f"goals both are held to: at {rate} req/s, added latency p50 ≤ {p50} ms and p99 "
        f"≤ {p99} ms.")
    if overhead and SCRAPED in overhead["arms"]:
        goal = [
            f"{name} adds {a['p50']:.3f} / {a['p99']:.3f} ms (p50 / p99): "
            + ("met" if a["p50"] <= p50 and a["p99"] <= p99 else "**not met**")
            for name in (BASE, SCRAPED)
            if (a := _at_goal(overhead, name, rate)) is not None]
        text += ("\n\n**Requests** (the overhead part: the same load, the arms interleaved). "
                 "Added latency in ms over the direct arm, CPU seconds of the gateway per "
                 "1,000 requests, and scraped / unscraped.\n\n")
        text += table(["req/s", "added p50", "scraped", "ratio", "added p99", "scraped",
                       "ratio", "CPU s / 1k", "scraped", "ratio", "errors (both)"],
                      _overhead_rows(overhead))
        if goal:
            text += f"\n\nAt {rate} req/s: " + "; ".join(goal) + "."
    if streaming and SCRAPED in streaming["paced"]:
        text += ("\n\n**Streams** (the streaming part, same steps as above).\n\n"
                 + table(["", BASE, SCRAPED, "ratio"], _streaming_rows(streaming)))
    scrape_rows = []
    for name, data in parts:
        s = data.get("scrape")
        if not s:
            continue
        idle = s.get("idle") or {}
        scrape_rows.append([name, f"{s['every_s']:g} s", f"{s['scrapes']:,}",
                            f(s["seconds_on"], 0), f(s["mean_ms"]), f(s.get("median_ms")),
                            f(s["max_ms"]), f(s["mean_bytes"], 0), f(s["max_bytes"], 0),
                            f(s.get("samples"), 0), ", ".join(s.get("encodings") or []) or "-",
                            str(s["errors"]) + (f" ({s['last_error']})" if s["errors"] else ""),
                            f(idle.get("gateway_cpu_ms_per_scrape")), f(idle.get("median_ms"))])
    if scrape_rows:
        text += ("\n\n**The scrapes.** Duration: request to last byte, at the scraper, during "
                 "the arm's steps. Size: the answer's bytes as sent (samples: the series of "
                 "the last scrape). *Idle*: after the part, 20 scrapes with no other load, the "
                 "gateway's CPU per scrape and the median duration; a scrape costs the same "
                 "whatever the request rate, so its share per request shrinks as the rate "
                 "grows.\n\n" + table(
                     ["part", "every", "scrapes", "seconds on", "mean ms", "median ms",
                      "max ms", "mean bytes", "max bytes", "samples", "encoding", "errors",
                      "idle: gateway CPU ms / scrape", "idle: median ms"],
                     scrape_rows))
    if other is not None and other >= SHARED_CORES:
        text += (f"\n\n**This run shared the machine:** processes the benchmark did not start "
                 f"kept {other:.2f} of its cores busy on average (*Machine and versions*). "
                 f"The gateways' core was taken from them at random moments, so the p99 "
                 f"figures above and their ratios mostly measure that, not the scraping; the "
                 f"CPU per request and the idle cost of a scrape hold up better.")
    text += ("\n\nOne run's ratio moves by tens of percent on this machine (see *How to read "
             "these numbers*). For a steadier reading of the "
             "CPU cost alone, `python -m bench.compare HEAD --scrape 1` runs the same "
             "revision twice at once, one of them scraped, in alternating closed-loop "
             "rounds.")
    return text
