"""``python -m nblib.report --publish-example``: copy a smoke run's report to the committed example."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblib import config, freshness
from nblib.files import atomic_write_bytes, read_json, write_json

EXAMPLES = Path(__file__).resolve().parents[2] / "reports" / "examples"


def publish_example(home: str | Path | None = None, dest: str | Path | None = None, label: str = "smoke-cpu",
                    allow_stale: bool = False) -> list[Path]:
    """Copy ``reports/compare.{html,md,csv}`` from a working root to ``reports/examples/compare-<label>.*`` in the
    repo, with ``pipeline-<label>.json`` (:func:`pipeline_timings`); a report whose inputs changed after it was
    rendered, or of a partial run, only with ``allow_stale``."""
    src = config.paths(home).reports
    dest = Path(dest) if dest is not None else EXAMPLES
    missing = [f"compare.{ext}" for ext in ("html", "md", "csv") if not (src / f"compare.{ext}").is_file()]
    if missing:
        raise config.MissingInput(
            f"{', '.join(missing)} not found in {src}: run the pipeline ({config.python_command()} -m nblib.pipeline --profile smoke) "
            "or notebook 06_compare first"
        )
    problems = freshness.report_problems(home)
    if problems and not allow_stale:
        raise config.UserError(
            f"the report in {config.relative(src)} does not show the current runs ({'; '.join(problems)}): rerun the "
            f"stages from the first stale one ({config.python_command()} -m nblib.pipeline --from 05, say), or "
            "publish it anyway with --allow-stale"
        )
    written = [atomic_write_bytes(dest / f"compare-{label}.{ext}", (src / f"compare.{ext}").read_bytes())
               for ext in ("html", "md", "csv")]
    timings = pipeline_timings(home)
    if timings is not None:
        written.append(write_json(dest / f"pipeline-{label}.json", timings))
    return written


def pipeline_timings(home: str | Path | None = None) -> dict | None:
    """The seconds of each stage of the pipeline run that rendered the report, and the machine they were
    measured on (``pipeline.json`` without its machine paths): what the README's times quote."""
    entry = freshness.ledger(home).get(freshness.REPORT_STAGE, {})
    path = config.resolve(entry["pipeline"], config.paths(home).home) / "pipeline.json" if entry.get("pipeline") else None
    if path is None or not path.is_file():
        return None
    status = read_json(path)
    keep = ("cpu", "cpu_cores", "cpu_half_units", "load_average", "gpu", "python", "torch")
    return {"profile": status["profile"], "total_seconds": status.get("total_seconds"),
            "stages": [{"name": s["name"], "seconds": s.get("seconds")} for s in status["stages"]],
            "machine": {k: v for k, v in status.get("machine", {}).items() if k in keep}}


@config.cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nblib.report", description="Publish the compare report as the committed example.")
    parser.add_argument("--publish-example", action="store_true", help="copy reports/compare.* to the repo's reports/examples/")
    parser.add_argument("--home", help="working root holding reports/ (default: NBLIB_HOME or the repo)")
    parser.add_argument("--label", default="smoke-cpu", help="file name label: reports/examples/compare-<label>.*")
    parser.add_argument("--allow-stale", action="store_true",
                        help="publish a report whose inputs changed after it was rendered, or of a partial run")
    args = parser.parse_args(argv)
    if not args.publish_example:
        parser.print_help()
        return 2
    written = publish_example(args.home, label=args.label, allow_stale=args.allow_stale)  # nothing there: config.cli says what, exit 2
    for path in written:
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
