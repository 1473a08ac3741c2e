"""``python -m nblib.report --publish-example``: copy a smoke run's report to the committed example."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nblib import config
from nblib.files import atomic_write_bytes

EXAMPLES = Path(__file__).resolve().parents[2] / "reports" / "examples"


def publish_example(home: str | Path | None = None, dest: str | Path | None = None, label: str = "smoke-cpu") -> list[Path]:
    """Copy ``reports/compare.{html,md,csv}`` from a working root to ``reports/examples/compare-<label>.*`` in the repo."""
    src = config.paths(home).reports
    dest = Path(dest) if dest is not None else EXAMPLES
    missing = [f"compare.{ext}" for ext in ("html", "md", "csv") if not (src / f"compare.{ext}").is_file()]
    if missing:
        raise config.MissingInput(
            f"{', '.join(missing)} not found in {src}: run the pipeline (python -m nblib.pipeline --profile smoke) "
            "or notebook 06_compare first"
        )
    return [atomic_write_bytes(dest / f"compare-{label}.{ext}", (src / f"compare.{ext}").read_bytes())
            for ext in ("html", "md", "csv")]


@config.cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nblib.report", description="Publish the compare report as the committed example.")
    parser.add_argument("--publish-example", action="store_true", help="copy reports/compare.* to the repo's reports/examples/")
    parser.add_argument("--home", help="working root holding reports/ (default: NBLIB_HOME or the repo)")
    parser.add_argument("--label", default="smoke-cpu", help="file name label: reports/examples/compare-<label>.*")
    args = parser.parse_args(argv)
    if not args.publish_example:
        parser.print_help()
        return 2
    written = publish_example(args.home, label=args.label)  # nothing there: config.cli says what, exit 2
    for path in written:
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
