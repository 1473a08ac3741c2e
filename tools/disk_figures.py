"""The disk figures of README.md's "Run on Kaggle" section, from a pipeline run's record.

    python tools/disk_figures.py dry-run/runs/pipeline-<time>/pipeline.json

``nblib.pipeline.run`` writes ``disk`` into ``pipeline.json`` at the end of every run: bytes per
top-level folder of the working root, per run folder and of the clone. A dry run's record also
holds ``full_profile_estimate_bytes`` (each run folder times the full profile's seeds) and what
that estimate assumes; the README's figures are these, not typed by hand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nblib.files import read_json

GB = 1e9


def lines(status: dict[str, Any]) -> list[str]:
    """The figures, one per line: run folders, other folders, the clone, the total and the estimate."""
    disk = status.get("disk")
    if disk is None:
        raise ValueError("this pipeline.json has no disk record: it was written before nblib.pipeline measured disk use")
    counts = disk.get("full_profile_counts", {})
    out = [f"{status['profile']} profile, started {status['started']}, working root {status['home']}:"]
    out += [f"  runs/{name}/: {size / GB:.2f} GB" + (f" (x{counts[name]} in the full profile)" if name in counts else "")
            for name, size in disk["runs"].items()]
    out += [f"  {name}/: {size / GB:.2f} GB" for name, size in disk["folders"].items()]
    out += [f"  the clone: {disk['clone'] / GB:.2f} GB", f"  all of it: {disk['total_bytes'] / GB:.2f} GB"]
    if "full_profile_estimate_bytes" in disk:
        out += [f"full profile, estimated: {disk['full_profile_estimate_bytes'] / GB:.1f} GB",
                f"  assumes: {disk['full_profile_estimate_assumes']}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/disk_figures.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_json", type=Path, help="a pipeline.json (runs/pipeline-<time>/ of a run)")
    args = parser.parse_args(argv)
    if not args.pipeline_json.is_file():
        print(f"{args.pipeline_json} not found: pass the pipeline.json of a pipeline run "
              "(python -m nblib.pipeline --profile full --dry-run writes one under dry-run/runs/pipeline-<time>/)",
              file=sys.stderr)
        return 1
    try:
        print("\n".join(lines(read_json(args.pipeline_json))))
    except ValueError as e:
        print(f"{args.pipeline_json}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
