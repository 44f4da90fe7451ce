"""Run the benchmarks and render docs/benchmarks.md.

    .venv/bin/python -m bench            quick mode (a few minutes)
    .venv/bin/python -m bench --full     full mode (longer, more rates and rounds)
    .venv/bin/python -m bench --only overhead,streaming,profile,model,large
    .venv/bin/python -m bench --ray      also the "ray" part: the relay to a worker on another
                                         Ray node (a two-node cluster on loopback; about two
                                         minutes more; needs Ray); --only ray runs it alone
    .venv/bin/python -m bench --report   render docs/benchmarks.md from bench/results/ only
    .venv/bin/python -m bench --scrape 15   the "modelhost (scraped)" arm scraped every 15 s
                                            (default 1 s; 0 leaves that arm out)
    .venv/bin/python -m bench --commit HEAD   measure a commit's src/ (exported with
                                              git archive), not the working tree

Every process it starts listens on 127.0.0.1 and is stopped when it ends (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PARTS = ("overhead", "streaming", "profile", "model", "large")  # the default run
OPT_IN = ("ray",)  # run when named in --only, or with --ray


def install_requirements() -> None:
    """The benchmark's own dependencies (matplotlib, psutil, py-spy) into this environment."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "-r", str(BENCH / "requirements.txt")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"pip install -r {BENCH / 'requirements.txt'} failed")


def use_commit(rev: str, export: Path) -> None:
    """Export `rev`'s src/ and make it the modelhost that this process and every gateway it
    starts import (PYTHONPATH comes before the editable install)."""
    root = BENCH.parent
    try:
        short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, check=True,
                               capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", rev, "src"], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot export src/ of {rev}: {exc}") from exc
    src = str(export / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    os.environ["MODELHOST_BENCH_COMMIT"] = short
    sys.path.insert(0, src)
    print(f"measuring modelhost at commit {short} (src/ exported to {src})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the long run (default: quick)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS + OPT_IN)} "
                             f"(default: {','.join(PARTS)})")
    parser.add_argument("--ray", action="store_true",
                        help="also run the 'ray' part: what the relay to a worker on another "
                             "Ray node costs per request (a two-node Ray cluster on loopback, "
                             "two gateways, one with a local worker and one with its worker on "
                             "the other node; about two minutes; skipped where Ray is not "
                             "installed)")
    parser.add_argument("--no-litellm", action="store_true",
                        help="leave out the LiteLLM arm (it is then reported as not run)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not pip install bench/requirements.txt first")
    parser.add_argument("--scrape", type=float, default=1.0, metavar="S",
                        help="scrape the /metrics of the 'modelhost (scraped)' arm (a second "
                             "modelhost, otherwise like the 'modelhost' arm) every S seconds "
                             "during its overhead and streaming steps, as Prometheus would "
                             "(default: 1, harsher than Prometheus's usual 15; 0 leaves that "
                             "arm out)")
    parser.add_argument("--report", action="store_true",
                        help="only render docs/benchmarks.md from bench/results/")
    parser.add_argument("--commit", metavar="REV",
                        help="measure the modelhost of this commit (its src/, exported to a "
                             "temporary folder) instead of the working tree's")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.ray and "ray" not in parts:
        parts.append("ray")
    unknown = set(parts) - set(PARTS + OPT_IN)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if args.scrape < 0:
        parser.error("--scrape must be 0 (no scraped arm) or a positive number of seconds")
    if not args.no_install:
        install_requirements()
    with tempfile.TemporaryDirectory(prefix="modelhost-src-") as export:
        if args.commit and not args.report:
            use_commit(args.commit, Path(export))
        # Imported only now: they need what was just installed (and the commit's src/).
        from .report import render
        from .runner import run_all

        if not args.report:
            try:
                run_all(full=args.full, parts=parts, litellm=not args.no_litellm,
                        scrape=args.scrape)
            except KeyboardInterrupt:
                print("benchmark interrupted; partial results are in bench/results/",
                      file=sys.stderr)
                return 130
    path = render()
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
