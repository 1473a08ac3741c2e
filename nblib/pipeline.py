"""Run the notebooks in order, headlessly, with papermill.

    python -m nblib.pipeline --profile smoke [--only STAGE[,STAGE]] [--from STAGE] [-p key=value]
    python -m nblib.pipeline --profile full --dry-run   # every full-size shape, 2 steps each, on a CPU

Each stage's own progress (step, loss, ETA) shows live while it runs; warnings a stage printed
are repeated in the pipeline's output; the run ends with where the results are and the report's
headline figures. Executed copies are kept in ``runs/pipeline-<timestamp>/`` with a
``pipeline.json`` status file. A failing cell, a kernel that dies (an out-of-memory kill),
Ctrl-C or SIGTERM (a Kaggle session ending) stops the run: ``pipeline.json`` marks the stage
failed or interrupted and names the last cell that started, and the command exits 1. One
pipeline or stage command runs per working root at a time (:mod:`nblib.lock`).

``--dry-run`` runs the notebooks in the ``dry-run`` profile: the full profile with each stage
file's ``dry-run:`` changes (a handful of steps, one seed, small measurement sweeps), plus GPT-2
small's pretraining shape and every fine-tune variant the machine supports (:func:`dry_run_stages`),
in its own working root (``<root>/dry-run`` unless ``--home`` is given).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from nblib import attention, config, freshness, ftmethods, lock, progress, reach
from nblib.files import make_new_dir, write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass(frozen=True)
class Stage:
    """One pipeline step: a notebook plus fixed parameters (the same notebook may run twice)."""

    name: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict)


FINETUNE_VARIANTS = ftmethods.PIPELINE  # the fine-tune variants the pipeline runs and compares (the table's)


def finetune_stage(variant: str) -> Stage:
    """Notebook 05 fine-tuning ``variant``."""
    return Stage(f"05_finetune_{variant.replace('-', '_')}", "05_finetune_lora_8bit.ipynb", {"variant": variant})


STAGES = (
    Stage("01_ingest", "01_ingest.ipynb"),
    Stage("02_clean", "02_clean.ipynb"),
    Stage("03_train_mha", "03_train_mha.ipynb"),
    Stage("04_train_gqa", "04_train_gqa.ipynb"),
    *(finetune_stage(v) for v in FINETUNE_VARIANTS),
    Stage("06_compare", "06_compare.ipynb"),
    Stage("07_chat_demo", "07_chat_demo.ipynb"),
)


class StageFailed(RuntimeError):
    """A notebook raised, its kernel died, or the run was interrupted; the message says where and why."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (how a Kaggle session ends, or ``kill``): stops the run the way Ctrl-C does."""


_signals: list[int] = []  # the stop signals main() received during this run


def _interrupted() -> KeyboardInterrupt:
    return Terminated() if _signals[0] == signal.SIGTERM else KeyboardInterrupt()


def _stop(signum: int, frame: object) -> None:
    """SIGTERM or Ctrl-C (main's handler): interrupt the running stage's kernel, so its cell ends
    as after Ctrl-C in Jupyter and the kernel shuts down idle (shut down mid-cell, ipykernel logs a
    ZMQError traceback); with no kernel running, or on a second signal, stop at once."""
    import psutil  # ipykernel's own dependency

    kernels = []
    for child in psutil.Process().children():
        try:
            if "ipykernel" in " ".join(child.cmdline()):
                kernels.append(child.pid)
        except psutil.Error:
            continue
    _signals.append(signum)
    if not kernels or len(_signals) > 1:
        raise _interrupted()
    for pid in kernels:
        os.killpg(pid, signal.SIGINT)  # the kernel leads its own session (jupyter_client); run_stage sees the cell end


def select(only: str | None = None, start: str | None = None, stages: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """Stages to run. ``only`` is a comma list; each item matches a stage name or its prefix
    (``05`` selects every fine-tune variant). ``start`` runs from the first match onwards."""
    stages = list(stages)

    def matches(key: str) -> list[Stage]:
        exact = [s for s in stages if s.name == key]
        found = exact or [s for s in stages if s.name.startswith(key) or s.name.split("_", 1)[1] == key]
        if not found:
            raise config.SettingsError(f"no stage matches {key!r}; stages: {', '.join(s.name for s in stages)}")
        return found

    if start is not None:
        if not start.strip():
            raise config.SettingsError(f"--from names no stage; stages: {', '.join(s.name for s in stages)}")
        stages = stages[stages.index(matches(start.strip())[0]) :]
    if only is not None:
        keys = [key.strip() for key in only.split(",") if key.strip()]
        if not keys:  # '' or ',' must not mean "every stage" nor "none"
            raise config.SettingsError(f"--only {only!r} names no stage; give a comma list of stage names or prefixes "
                                       f"from: {', '.join(s.name for s in stages)}")
        wanted = {s.name for key in keys for s in matches(key)}
        stages = [s for s in stages if s.name in wanted]
    return stages


def stage_params(stage: Stage, profile: str, user: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    """Parameters for one stage: its fixed ones, the profile, and the user's ``key=value`` pairs
    the notebook declares (``STAGE.key=value`` targets one stage)."""
    params = {"profile": profile, **stage.params}
    for key, value in user.items():
        target, dot, name = key.rpartition(".")
        if dot and not (stage.name == target or stage.name.startswith(target)):
            continue
        if name in declared:
            params[name] = value
    return params


def declared_parameters(notebook: Path) -> set[str]:
    """Names in the notebook's ``parameters`` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def check_user_params(stages: list[Stage], user: dict[str, Any], declared: dict[str, set[str]]) -> None:
    """Refuse a ``-p`` that no selected stage declares (a typo must not pass silently), with the closest name."""
    for key in user:
        target, dot, name = key.rpartition(".")
        scope = [s for s in stages if not dot or s.name == target or s.name.startswith(target)]
        if not any(name in declared[s.notebook] for s in scope):
            known = sorted({p for s in scope for p in declared[s.notebook]})
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise config.SettingsError(f"parameter {key!r} is not declared by any selected stage "
                             f"({', '.join(s.name for s in scope) or 'none'}){hint}")


# The profile file(s) each notebook reads its settings from, and which notebook parameter goes to
# which setting there (None: every parameter named like one of the file's settings).
SETTINGS_FILES: dict[str, tuple[tuple[str, dict[str, str] | None], ...]] = {
    "01_ingest.ipynb": (("ingest", None),),
    "02_clean.ipynb": (("clean", None), ("dialogue", {"dialogue_targets": "targets"})),
    "03_train_mha.ipynb": (("train", None),),
    "04_train_gqa.ipynb": (("train", None),),
    "05_finetune_lora_8bit.ipynb": (("finetune", None),),
    "06_compare.ipynb": (("compare", None),),
    "07_chat_demo.ipynb": (("chat", None),),
}


# Notebook parameters that name a folder under runs/ (a run's name), outside any profile file.
FOLDER_PARAMETERS = ("name",)


def check_settings(stages: list[tuple[Stage, dict[str, Any]]], profile: str) -> None:
    """Refuse, before any stage runs, a value a selected stage would refuse (``seeds=[]`` must not
    let earlier stages run first): each stage's merged settings, validated as its notebook does."""
    for stage, params in stages:
        for key in FOLDER_PARAMETERS:
            if params.get(key) is not None:
                try:
                    config.folder_name(key, params[key])
                except config.SettingsError as e:
                    raise config.SettingsError(f"stage {stage.name}: {e}") from None
        for file, names in SETTINGS_FILES.get(stage.notebook, ()):
            schema = config.profile_table(file)["schema"]
            names = names or {k: k for k in params if k in schema}
            given = {setting: params[param] for param, setting in names.items() if param in params}
            try:
                config.settings(file, profile, preset=params.get("preset") if file == "train" else None, **given)
            except ValueError as e:
                raise config.SettingsError(f"stage {stage.name}: {e}") from None


def _cell_label(notebook: Path, source: str) -> str:
    """``cell N of NAME`` counted in the source notebook (papermill's injected cell shifts indices)."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    for i, cell in enumerate(cells, 1):
        if cell.cell_type == "code" and cell.source == source:
            return f"cell {i} of {notebook.name}"
    return f"a cell of {notebook.name}"


def last_started_cell(executed: Path, notebook: Path) -> str:
    """The cell that was running when a stage stopped, from papermill's saved cell states."""
    import nbformat

    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (OSError, ValueError):
        return f"a cell of {notebook.name} (the executed copy could not be read)"
    # papermill marks every cell "completed" once execution stops, whatever happened; the last one
    # with a start time is the one that was running
    started = [c for c in cells if c.cell_type == "code" and c.metadata.get("papermill", {}).get("start_time")
               and "injected-parameters" not in c.metadata.get("tags", [])]
    if not started:
        return f"before the first cell of {notebook.name}"
    source = started[-1].source
    lines = "\n".join("    " + line for line in source.splitlines()[:4])
    return f"{_cell_label(notebook, source)}:\n{lines}"


class Watcher:
    """Shows a stage's live progress (``$NBLIB_PROGRESS``) while papermill runs it: one rewritten
    line on a terminal, else a line at most every ``interval`` seconds (logs stay short)."""

    def __init__(self, path: Path, label: str, out: TextIO | None = None, interval: float = 30.0):
        self.path, self.label, self.out = path, label, out or sys.stdout
        self.tty = self.out.isatty()
        self.interval = 1.0 if self.tty else interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.perf_counter()
        self.shown = ""

    def __enter__(self) -> Watcher:
        self.path.unlink(missing_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty and self.shown:
            self.out.write("\r\033[K")
            self.out.flush()
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            status = progress.read_status(self.path)
            elapsed = time.perf_counter() - self.started
            text = f"  {self.label} {elapsed:.0f} s | " + (progress.line(status) if status else STARTING)
            if text == self.shown:
                continue
            self.shown = text
            if self.tty:
                self.out.write("\r\033[K" + text[: os.get_terminal_size(self.out.fileno()).columns - 1])
            else:
                self.out.write(text + "\n")
            self.out.flush()


STARTING = "starting: the notebook's kernel and its imports"  # before the stage's first progress line
_WARNING = re.compile(r"(?:^.*?:\d+: )?(\w*Warning: .*|warning: .*)")


def stage_warnings(executed: Path, limit: int = 5) -> list[str]:
    """Warnings a stage's cells printed (stderr), without their file:line prefix, deduplicated, so
    the pipeline can repeat them."""
    import nbformat

    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (OSError, ValueError):
        return []
    found: list[str] = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                for line in out.get("text", "").splitlines():
                    match = _WARNING.match(line.strip())
                    if match and match.group(1) not in found:
                        found.append(match.group(1))
    return found[:limit]


def run_stage(stage: Stage, out_dir: Path, params: dict[str, Any], progress_on: bool) -> Path:
    """Execute one notebook into ``out_dir``; raise :class:`StageFailed` naming the cell and the reason."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / f"{stage.name}.ipynb"
    status_file = out_dir / f".{stage.name}.progress.json"
    os.environ[progress.ENV] = str(status_file)
    # ipykernel 6 (Kaggle's image) starts debugpy, which prints a "frozen modules" notice on
    # Python 3.11+ to every kernel's stderr; the kernel inherits this and stays quiet.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    notebook = NOTEBOOKS / stage.notebook
    try:
        with Watcher(status_file, stage.name) if progress_on else nullcontext():
            papermill.execute_notebook(
                str(notebook), str(output), parameters=params, kernel_name="python3", progress_bar=False,
                cwd=str(NOTEBOOKS),
                # The kernel's own start-up notices (e.g. ipykernel 7's TCP warning on loopback) are
                # noise here; errors still show, and a cell's warnings land in its outputs as usual.
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
    except PapermillExecutionError as e:
        if _signals:  # the cell ended because _stop interrupted it
            raise _interrupted() from None
        source = "\n".join("    " + line for line in e.source.splitlines()[:8])
        raise StageFailed(
            f"stage {stage.name} failed in {_cell_label(notebook, e.source)}:\n"
            f"{source}\n  {e.ename}: {e.evalue}\n  executed copy: {config.relative(output)}"
        ) from None
    except (DeadKernelError, CellTimeoutError) as e:
        reason = ("its kernel died (killed from outside, most often for running out of memory: lower batch_size "
                  "or use a smaller profile)" if isinstance(e, DeadKernelError) else f"a cell timed out ({e})")
        raise StageFailed(f"stage {stage.name} stopped in {last_started_cell(output, notebook)}\n  {reason}\n"
                          f"  executed copy: {config.relative(output)}; run the stage again to resume from its "
                          "last checkpoint") from None
    finally:
        os.environ.pop(progress.ENV, None)
    return output


def check_hardware(stages: list[tuple[Stage, dict[str, Any]]]) -> None:
    """Refuse, before any stage runs or anything is written, a GPU a selected stage (with its
    parameters) could not run on: every stage after cleaning runs on the GPU when there is one, a
    fine-tune of an 8- or 4-bit base needs bitsandbytes' kernels too (``machine.check_build``)."""
    from nblib import finetune, machine

    gpu_stages = [(s, p) for s, p in stages if not s.notebook.startswith(("01_", "02_"))]
    if not gpu_stages:
        return
    device = machine.detect()  # torch's kernels
    for stage, params in gpu_stages:
        if "variant" in params and stage.notebook.startswith("05_"):
            machine.check_build(device, finetune.QUANTIZED_BITS.get(finetune.variant(params["variant"]).mode))


def pretrain_runs(profile: str) -> list[str]:
    """The run folders notebooks 03 and 04 write under ``profile`` (its ``variants`` setting)."""
    return [attention.get(k).folder for k in config.settings("train", profile)["variants"]]


def dry_run_stages() -> tuple[Stage, ...]:
    """The stages of ``--dry-run``: every stage, GPT-2 small's pretraining (03 with the
    ``gpt2-small`` preset, as ``pretrain-gpt2-small``), and the fine-tune in every variant this
    machine supports; the compare stage reads the MHA/GQA pair and those fine-tunes, the chat
    stage talks to the first of them."""
    from nblib import finetune, machine

    def supported(name: str) -> bool:
        if finetune.variant(name).mode != "8bit":
            return True
        try:
            machine.check_8bit()
        except RuntimeError:
            return False
        return True

    variants = [v for v in finetune.VARIANTS if supported(v)]
    seed = config.settings("finetune", config.DRY_RUN)["seeds"][0]
    by_name = {s.name: s for s in STAGES}
    return (
        *(by_name[n] for n in ("01_ingest", "02_clean", "03_train_mha")),
        Stage("03_train_gpt2_small", "03_train_mha.ipynb", {"preset": "gpt2-small", "name": "pretrain-gpt2-small"}),
        by_name["04_train_gqa"],
        *(finetune_stage(v) for v in variants),
        Stage("06_compare", "06_compare.ipynb", {"runs": [*pretrain_runs(config.DRY_RUN), *(f"finetune-{v}" for v in variants)]}),
        Stage("07_chat_demo", "07_chat_demo.ipynb", {"model": f"runs/finetune-{variants[0]}/seed-{seed}/merged"}),
    )


def dry_run_settings() -> dict[str, dict[str, Any]]:
    """Each stage file's ``dry-run:`` changes to the full profile (what pipeline.json records)."""
    tables = {path.stem: config.profile_table(path.stem) for path in sorted(config.PROFILE_DIR.glob("*.yaml"))}
    return {stage: table[config.DRY_RUN] for stage, table in tables.items() if table.get(config.DRY_RUN)}


def run(
    profile: str = "smoke",
    only: str | None = None,
    start: str | None = None,
    params: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    time_budget_minutes: float | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run the selected stages in order; returns the status dict also saved as ``pipeline.json``.

    ``time_budget_minutes`` is the whole session's: each stage that declares
    ``time_budget_minutes`` gets what is left of it, so a Kaggle session ends with checkpoints.
    ``dry_run`` (with ``profile="full"``) runs :func:`dry_run_stages` in the ``dry-run`` profile.
    """
    if dry_run and profile != "full":
        raise ValueError(f"a dry run is of the full profile: use --profile full --dry-run (not --profile {profile})")
    profile = config.DRY_RUN if dry_run else config.resolve_profile(profile)
    stages = select(only, start, dry_run_stages() if dry_run else STAGES)
    user = params or {}
    declared = {s.notebook: declared_parameters(NOTEBOOKS / s.notebook) for s in stages}
    check_user_params(stages, user, declared)
    check_settings([(s, stage_params(s, profile, user, declared[s.notebook])) for s in stages], profile)
    check_hardware([(s, stage_params(s, profile, user, declared[s.notebook])) for s in stages])
    reach.check((s.name, s.notebook, stage_params(s, profile, user, declared[s.notebook])) for s in stages)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if out_dir is None:  # a new folder, also for two runs started within one second
        out_dir = make_new_dir(config.paths().runs / f"pipeline-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {"profile": profile, "home": str(config.home()), "started": stamp, "stages": []}
    if dry_run:
        from nblib import finetune

        status["dry_run"] = dry_run_settings()
        if any(s.notebook.startswith("05_") for s in stages):
            finetune.random_base(config.resolve(config.settings("finetune", config.DRY_RUN)["base_model"]))
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        if _signals:  # the previous stage ended normally although interrupted
            raise _interrupted()
        print(f"[{i}/{len(stages)}] {stage.name} ...", flush=True)
        t0 = time.perf_counter()
        entry = {"name": stage.name, "notebook": stage.notebook, "params": stage_params(stage, profile, user, declared[stage.notebook])}
        if time_budget_minutes is not None and "time_budget_minutes" in declared[stage.notebook]:
            entry["params"]["time_budget_minutes"] = max(0.1, time_budget_minutes - (t0 - t_start) / 60)
        status["stages"].append(entry)
        try:
            executed = run_stage(stage, out_dir, entry["params"], progress)
        except (StageFailed, KeyboardInterrupt) as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            error = (f"stage {stage.name} interrupted ({'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}) in "
                     f"{last_started_cell(out_dir / f'{stage.name}.ipynb', NOTEBOOKS / stage.notebook)}\n  to resume, run "
                     f"the same command again (or with --from {stage.name}): training stages continue from their "
                     "last checkpoint" if interrupted else str(e))
            entry.update(status="interrupted" if interrupted else "failed", seconds=round(time.perf_counter() - t0, 1), error=error)
            write_json(out_dir / "pipeline.json", status)
            raise StageFailed(error) from None
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 1), warnings=stage_warnings(executed))
        freshness.record(stage.name, profile, pipeline=config.relative(out_dir))
        write_json(out_dir / "pipeline.json", status)
        print(f"[{i}/{len(stages)}] {stage.name} ok in {entry['seconds']:.1f} s", flush=True)
        for line in entry["warnings"]:
            print(f"      {stage.name}: {line}", flush=True)
    status["total_seconds"] = round(sum(s["seconds"] for s in status["stages"]), 1)
    status["out_dir"] = config.relative(out_dir)
    status["disk"] = disk_usage(estimate=dry_run)
    from nblib import machine  # torch: after the stages, which run in their own kernels

    status["machine"] = machine.info()  # where the seconds above were measured, and the load at the end
    status["stale"] = freshness.stale()
    write_json(out_dir / "pipeline.json", status)
    return status


def _bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``path`` (links not followed), without top-level entries named in ``skip`` or ``.venv*``."""
    entries = [path] if path.is_file() else [e for e in path.iterdir() if e.name not in skip and not e.name.startswith(".venv")]
    total = 0
    for entry in entries:
        files = [entry] if entry.is_file() else entry.rglob("*")
        total += sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    return total


def disk_usage(estimate: bool = False) -> dict[str, Any]:
    """What the working root holds (``pipeline.json``'s ``disk``): bytes per top-level folder, per
    run folder (``runs/<name>/seed-<seed>``, W&B offline files included) and of the clone (the
    repository minus virtual envs and the outputs); ``dry-run/`` and virtual envs are left out.

    ``estimate`` (a dry run) adds ``full_profile_estimate_bytes``: each run folder times the seeds
    the full profile runs of its stage, plus data, reports, executed notebooks and the clone.
    """
    home, repo, runs_dir = config.home(), Path(__file__).resolve().parents[1], config.paths().runs
    outputs = ("data", "runs", "reports", "models", "dry-run")
    inside = home.relative_to(repo).parts[:1] if home != repo and home.is_relative_to(repo) else ()
    folders = {e.name: _bytes(e) for e in sorted(home.iterdir())
               if e.name not in ("runs", "dry-run") and not e.name.startswith(".venv") and e.resolve() != repo
               and (home != repo or e.name in outputs)}  # a working root that is the clone: its outputs only
    run_folders = {config.relative(f, runs_dir): _bytes(f)
                   for e in sorted(runs_dir.glob("*/")) for f in sorted(e.glob("seed-*/")) or [e]}
    clone = _bytes(repo, skip=outputs + inside)  # a working root inside the clone is not the clone
    disk: dict[str, Any] = {"folders": folders, "runs": run_folders, "clone": clone,
                            "total_bytes": sum(folders.values()) + sum(run_folders.values()) + clone}
    if not estimate:
        return disk
    seeds = {"pretrain": len(config.settings("train", "full")["seeds"]),
             "finetune": len(config.settings("finetune", "full")["seeds"])}
    full_runs = {*pretrain_runs("full"), *(f"finetune-{v}" for v in FINETUNE_VARIANTS)}  # what STAGES train
    counts = {f: seeds[f.split("-")[0]] if f.split("/")[0] in full_runs else 1 for f in run_folders}
    missing = sorted(full_runs - {f.split("/")[0] for f in run_folders})
    disk["full_profile_counts"] = counts
    disk["full_profile_estimate_bytes"] = (sum(run_folders[f] * n for f, n in counts.items()) + clone
                                           + sum(v for k, v in folders.items() if k != "models"))
    disk["full_profile_estimate_assumes"] = (
        "each run folder of the full profile's runs measured here times the seeds the full profile runs of its stage, "
        "any other folder (the gpt2-small preset run, executed notebooks) once (full_profile_counts); a "
        "finished run keeps the same files whatever its steps (pretraining deletes its ckpt*.pt, a fine-tune prunes "
        "its checkpoints: adapter/ or merged/ hold the best weights) but metrics logs and W&B offline files grow with the steps and "
        "are undercounted; data/ is what this run's sources gave; models/ (the dry run's random base; the full "
        "profile downloads gpt2 into the Hugging Face cache) is left out"
        + (f"; runs of the full profile not measured here, so not counted: {', '.join(missing)}" if missing else "")
    )
    return disk


def headlines(report_md: Path, n: int = 4) -> list[str]:
    """The first ``n`` at-a-glance lines of a rendered report (Markdown), without the bold marks."""
    if not report_md.is_file():
        return []
    lines = report_md.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("## At a glance")
    except ValueError:
        return []
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("- "):
            out.append(line[2:].replace("**", ""))
    return out[:n]


def closing_summary(status: dict[str, Any]) -> str:
    """Where the results are, what to try next and the report's headline figures."""
    paths = config.paths()
    stages = [s["name"] for s in status["stages"]]
    lines = [f"pipeline finished: {len(stages)} stage(s) in {status['total_seconds']:.1f} s ({status['profile']} profile)",
             f"  executed notebooks: {status['out_dir']}/ (pipeline.json says how each stage went)"]
    report = paths.reports / "compare.html"
    fresh = "06_compare" in stages  # a report from an earlier run may not match the runs any more
    if report.is_file():
        lines.append(f"  report:             {config.relative(report)} (also .md and .csv)"
                     + ("" if fresh else "; not rendered by this run: run 06_compare to refresh it"))
    transcript = paths.reports / "chat_transcript.md"
    if transcript.is_file():
        lines.append(f"  chat transcript:    {config.relative(transcript)}")
    chat_model = config.resolve(config.settings("chat", status["profile"])["model"])
    if chat_model.is_dir():
        lines.append(f"  chat with it:       {config.python_command()} -m nblib.chat --model {config.relative(chat_model)}")
    stale = status.get("stale", {})
    if stale:
        first = next(iter(stale))  # the first of them to have run: a rerun from it reruns them all
        lines.append(f"  stale (inputs changed after they ran): {', '.join(stale)}; e.g. {first}: {stale[first]}")
        profile = "full --dry-run" if status["profile"] == config.DRY_RUN else status["profile"]
        lines.append(f"    rerun them: {config.python_command()} -m nblib.pipeline --profile {profile} --from {first}")
    figures = headlines(paths.reports / "compare.md") if fresh and "06_compare" not in stale else []
    if figures:
        lines.append("  at a glance:")
        lines += [f"    - {f}" for f in figures]
    return "\n".join(lines)


@config.cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nblib.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", help="smoke (CPU minutes), full (GPU) or auto")
    parser.add_argument("--only", help="comma list of stages (name or prefix, e.g. 03,04)")
    parser.add_argument("--from", dest="start", help="start at this stage")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="notebook parameter; STAGE.KEY=VALUE for one stage")
    parser.add_argument("--time-budget-minutes", type=float, help="the whole session's time: training stages stop with a checkpoint in time")
    parser.add_argument("--home", help="working root (sets NBLIB_HOME)")
    parser.add_argument("--out", type=Path, help="folder for executed notebooks (default runs/pipeline-<time>)")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--no-progress", action="store_true", help="no live progress lines")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --profile full: every stage at full size for a handful of steps, on any machine "
                             "(working root <root>/dry-run unless --home)")
    args = parser.parse_args(argv)
    if args.list:
        for s in dry_run_stages() if args.dry_run else STAGES:
            fixed = ", ".join(f"{k}={v}" for k, v in s.params.items())
            print(f"{s.name:<24} notebooks/{s.notebook}" + (f"  ({fixed})" if fixed else ""))
        return 0
    if args.home or args.dry_run:
        os.environ["NBLIB_HOME"] = str(Path(args.home).resolve() if args.home else config.home() / "dry-run")
    if os.environ.get("NBLIB_MIRROR", "").strip():  # as the user's shell meant it: the stages' kernels run in notebooks/
        os.environ["NBLIB_MIRROR"] = str(Path(os.environ["NBLIB_MIRROR"]).expanduser().resolve())
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with lock.hold("python -m nblib.pipeline " + " ".join(sys.argv[1:] if argv is None else argv)):
            status = run(args.profile, args.only, args.start, config.parse_params(args.param), args.out,
                         not args.no_progress, args.time_budget_minutes, args.dry_run)
    except config.SettingsError:
        raise  # config.cli: a usage error (lock.HomeBusy among them), exit 2
    except (StageFailed, ValueError, FileNotFoundError) as e:
        print(f"pipeline stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # no stage was running
        print(f"pipeline stopped: interrupted ({'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}) between stages; "
              "to resume, run the same command again", file=sys.stderr)
        return 1
    finally:
        _signals.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(closing_summary(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
