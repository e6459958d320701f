"""Line coverage of crossvit/, pipelines/ and jobs/, per file and per kind of process that measured it.

Run the suite with coverage on, from no earlier data files (README, "Testing"), then
``python tests/coverage_by_process.py``. It sorts
coverage.py's parallel data files by the command line that wrote them (recorded in each file) and combines
them into two reports:

- ``tests``: pytest's own process and the ``python -m jobs...`` processes the tests start, directly or through
  ``ray job submit``: the figures to keep from falling;
- ``all``: those plus Ray's worker processes (tasks, actors, Train workers, Serve replicas). Reported, not
  gated: a worker that is killed, as several tests do on purpose, loses what it measured.

``--json out.json`` writes both as {file: percent}; ``--baseline before.json`` compares the ``tests`` figures
file by file and exits 1 if one fell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import coverage

REPO = Path(__file__).resolve().parent.parent


def _is_ray_worker(data_file: Path) -> bool:
    """A file a Ray worker wrote, or one that cannot be read (a process killed while saving): not gated."""
    try:
        with contextlib.closing(sqlite3.connect(data_file)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'sys_argv'").fetchone()
    except sqlite3.DatabaseError:
        return True
    return bool(row) and "ray/_private/workers/" in row[0]


def _percents(data_files: list[Path], name: str) -> dict[str, float]:
    """Combine ``data_files`` (kept on disk) into .coverage-<name> and return each source file's line coverage."""
    cov = coverage.Coverage(data_file=str(REPO / f".coverage-{name}"), config_file=str(REPO / "pyproject.toml"))
    cov.combine([str(f) for f in data_files], keep=True)
    cov.save()
    report = REPO / f".coverage-{name}.json"
    cov.json_report(outfile=str(report))
    files = json.loads(report.read_text())["files"]
    return {path: round(f["summary"]["percent_covered"], 1) for path, f in sorted(files.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write {'tests': {file: percent}, 'all': {...}} here")
    parser.add_argument("--baseline", help="a --json output of an earlier run: fail if a file's 'tests' figure fell")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # [tool.coverage.paths] and the report's file names are relative to the repository

    data_files = sorted(REPO.glob(".coverage.*"))
    if not data_files:
        parser.error("no .coverage.* files here: run the suite with COVERAGE_PROCESS_START set first")
    workers = [f for f in data_files if _is_ray_worker(f)]
    tests = [f for f in data_files if f not in workers]
    figures = {"tests": _percents(tests, "tests"), "all": _percents(data_files, "all")}
    print(f"{len(tests)} data files from the tests' processes, {len(workers)} from Ray's workers\n")
    baseline = json.loads(Path(args.baseline).read_text())["tests"] if args.baseline else {}
    print(f"{'file':48} {'before':>7} {'tests':>7} {'all':>7}")
    fell = []
    for path in sorted(set(figures["tests"]) | set(baseline)):
        percent, before = figures["tests"].get(path, 0.0), baseline.get(path)
        mark = ""
        if before is not None and percent < before:
            fell.append(path)
            mark = "  <- fell"
        shown = "" if before is None else f"{before:.1f}"
        print(f"{path:48} {shown:>7} {percent:7.1f} {figures['all'].get(path, 0.0):7.1f}{mark}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if fell:
        print(f"\ncoverage fell in {len(fell)} file(s): {', '.join(fell)}")
    return 1 if fell else 0


if __name__ == "__main__":
    sys.exit(main())
