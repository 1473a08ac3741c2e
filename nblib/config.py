"""Profiles and their settings, the working root and its folders, the offline mirror, seeds.

A *profile* sets the sizes of every stage: ``smoke`` runs on a CPU in minutes, ``full`` is meant
for a Kaggle GPU, ``auto`` picks ``full`` when CUDA is available, and ``dry-run`` is the full
profile with a handful of steps (each stage file's ``dry-run:`` changes, applied after any preset),
so every full-size shape and setting can be exercised on a CPU. Each stage's settings live in
``nblib/profiles/<stage>.yaml`` as one ``base`` mapping plus the keys each profile changes (like
nanoGPT's ``config/*.py`` override files), a ``schema`` that says what every setting accepts, and
optionally named ``presets`` of sizes. :func:`settings` merges base, profile, preset and the
caller's overrides, and validates the result against the schema before any work starts.

Schema specs, one per setting: ``bool``, ``text``, ``mapping``, ``list of <spec>`` (``list of float > 0``: each item checked), ``list of text``
(``nonempty list of ...`` refuses ``[]``), ``any``, ``int``, ``float`` (optionally ``>= 1``, ``> 0``, ``in [0, 1)``), ``one of a, b, c``; a trailing
``or null`` also admits ``None``.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import functools
import math
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml

DRY_RUN = "dry-run"
PROFILES = ("smoke", "full", DRY_RUN)
PROFILE_DIR = Path(__file__).with_name("profiles")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
KAGGLE_WORKING = Path("/kaggle/working")


class SettingsError(ValueError):
    """Settings that do not fit a stage's schema; the message names each setting and what it accepts."""


class MissingInput(FileNotFoundError):
    """A file an earlier stage writes is absent or unusable; the message names it and the notebook that
    (re)writes it. A user's step to take, so :func:`cli` prints it without a traceback."""


class UserError(Exception):
    """A state of the user's files or machine that the user resolves, not a fault of the code: :func:`cli`
    prints its message in one line (exit 2) with no traceback."""


class Refused(UserError, ValueError):
    """A file or run folder a command will not read, resume or overwrite as it is (damaged, written with
    other settings, without its summary); the message names it and the way out."""


def resolve_profile(profile: str = "auto") -> str:
    """Return ``smoke``, ``full`` or ``dry-run``; ``auto`` picks ``full`` when a CUDA GPU is present."""
    if profile == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "smoke"
    if profile not in PROFILES:
        raise SettingsError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)} or 'auto'")
    return profile


@lru_cache(maxsize=None)
def _table(path: Path, mtime_ns: int) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def profile_table(stage: str) -> dict[str, Any]:
    """The parsed ``profiles/<stage>.yaml`` (``schema``, ``base``, ``smoke``, ``full``, ``presets``)."""
    path = PROFILE_DIR / f"{stage}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ValueError(f"no profile file for stage {stage!r} ({path}); known stages: {', '.join(known)}")
    table = _table(path, path.stat().st_mtime_ns)
    for section in ("schema", "base"):
        if not isinstance(table.get(section), dict):
            raise ValueError(f"{path} has no {section!r} mapping")
    return table


def free_keys(stage: str) -> frozenset[str]:
    """Settings that may change between sessions of one run, or between compared runs, without
    changing any result (``free:`` in the stage's profile file)."""
    return frozenset(profile_table(stage).get("free", ()))


def settings(stage: str, profile: str = "auto", preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Settings of ``stage`` under ``profile``: base, the profile's changes, the named ``preset``,
    then the non-``None`` ``overrides``; validated, with ``profile`` (and ``preset``) added.
    ``dry-run`` is ``full``'s changes, the preset, then the file's ``dry-run:`` changes.

    An unknown setting name is an error that suggests the closest one; a value outside the
    schema is an error naming the setting and the values it accepts.
    """
    table = profile_table(stage)
    name = resolve_profile(profile)
    out = {**table["base"], **(table.get("full" if name == DRY_RUN else name) or {})}
    if preset is not None:
        known = table.get("presets") or {}
        if preset not in known:
            raise ValueError(f"unknown preset {preset!r} for stage {stage!r}; known presets: {', '.join(sorted(known)) or 'none'}")
        out.update(known[preset])
    if name == DRY_RUN:
        out.update(table.get(DRY_RUN) or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(k for k in given if k not in out)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(out), n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise SettingsError(
            f"unknown setting(s) for stage {stage!r}: {', '.join(hints)}; valid: {', '.join(sorted(out))}"
        )
    out.update(given)
    out = validate(stage, out, table["schema"])
    out["profile"] = name
    if "presets" in table:
        out["preset"] = preset
    return out


# ---------------------------------------------------------------------------------------------
# schema


_NUMBER = re.compile(r"^(int|float)(?:\s*(>=|>|<=|<)\s*(\S+)|\s+in\s+([\[(])\s*(\S+),\s*(\S+)\s*([\])]))?$")
_MAPPING_OF = re.compile(r"^mapping of \((.+)\)$")  # mapping of (int >= 0 or null): each value checked
_LIST_OF = re.compile(r"^(nonempty )?list of (.+)$")  # list of float > 0: each item checked


def describe(spec: str) -> str:
    """A spec in words for error messages (``int >= 1`` -> ``an integer >= 1``)."""
    nullable = spec.endswith(" or null")
    core = spec.removesuffix(" or null")
    words = {"bool": "true or false", "text": "a text", "mapping": "a mapping", "list of int": "a list of integers",
             "list of text": "a list of texts", "nonempty list of int": "a non-empty list of integers",
             "nonempty list of text": "a non-empty list of texts", "any": "anything"}.get(core)
    if words is None and (m := _MAPPING_OF.match(core)):
        words = f"a mapping whose values are each {describe(m.group(1))}"
    if words is None and (m := _LIST_OF.match(core)):
        words = f"a {'non-empty ' if m.group(1) else ''}list whose items are each {describe(m.group(2))}"
    if words is None and core.startswith("one of "):
        words = "one of " + ", ".join(repr(c.strip()) for c in core[7:].split(","))
    if words is None:
        m = _NUMBER.match(core)
        if not m:
            raise ValueError(f"bad schema spec {spec!r}")
        kind = "an integer" if m.group(1) == "int" else "a number"
        if m.group(2):
            words = f"{kind} {m.group(2)} {m.group(3)}"
        elif m.group(4):
            words = f"{kind} in {m.group(4)}{m.group(5)}, {m.group(6)}{m.group(7)}"
        else:
            words = kind
    return f"{words}, or null" if nullable else words


def _number(value: Any, kind: str) -> int | float | None:
    """``value`` as an int/float if it is one (numeric text such as ``"1e-4"`` included), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            return None
        return int(value)
    return float(value) if isinstance(value, float) else value


def check_value(spec: str, value: Any) -> tuple[bool, Any]:
    """``(ok, value)`` for ``value`` under ``spec``; numbers given as text are converted."""
    if value is None:
        return spec.endswith(" or null"), None
    core = spec.removesuffix(" or null")
    if core == "any":
        return True, value
    if core == "bool":
        return isinstance(value, bool), value
    if core == "text":
        return isinstance(value, str), value
    if core == "mapping":
        return isinstance(value, dict), value
    if m := _MAPPING_OF.match(core):
        if not isinstance(value, dict):
            return False, value
        checked = {k: check_value(m.group(1), v) for k, v in value.items()}
        return all(ok for ok, _ in checked.values()), {k: v for k, (_, v) in checked.items()}
    if m := _LIST_OF.match(core):
        if not isinstance(value, (list, tuple)) or (m.group(1) and not value):
            return False, value
        if m.group(2) == "text":
            return all(isinstance(v, str) for v in value), list(value)
        items = [check_value(m.group(2), v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if core.startswith("one of "):
        return value in [c.strip() for c in core[7:].split(",")], value
    m = _NUMBER.match(core)
    if not m:
        raise ValueError(f"bad schema spec {spec!r}")
    number = _number(value, m.group(1))
    if number is None or (isinstance(number, float) and math.isinf(number)):
        return False, value
    if m.group(2):
        bound = float(m.group(3))
        ok = {">=": number >= bound, ">": number > bound, "<=": number <= bound, "<": number < bound}[m.group(2)]
        return ok, number
    if m.group(4):
        lo, hi = float(m.group(5)), float(m.group(6))
        ok = (number >= lo if m.group(4) == "[" else number > lo) and (number <= hi if m.group(7) == "]" else number < hi)
        return ok, number
    return True, number


def validate(stage: str, values: dict[str, Any], schema: dict[str, str]) -> dict[str, Any]:
    """Check every setting against ``schema``; all problems are reported together."""
    missing = sorted(set(values) - set(schema))
    if missing:
        raise ValueError(f"profiles/{stage}.yaml: no schema entry for {', '.join(missing)}")
    out, problems = {}, []
    for key, value in values.items():
        ok, converted = check_value(schema[key], value)
        if ok:
            out[key] = converted
        elif (m := _MAPPING_OF.match(schema[key].removesuffix(" or null"))) and isinstance(value, dict):
            problems += [f"{key}.{k}={v!r} must be {describe(m.group(1))}" for k, v in value.items()
                         if not check_value(m.group(1), v)[0]]  # name the entry, not the whole mapping
        else:
            problems.append(f"{key}={value!r} must be {describe(schema[key])}")
    if problems:
        raise SettingsError(f"invalid {stage} setting(s): " + "; ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# working root, mirror, seeds


def home() -> Path:
    """The working root: ``$NBLIB_HOME``, else ``/kaggle/working`` on Kaggle, else the repo root."""
    env = os.environ.get("NBLIB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if KAGGLE_WORKING.is_dir():
        return KAGGLE_WORKING
    if (_PACKAGE_ROOT / "pyproject.toml").is_file():
        return _PACKAGE_ROOT
    return Path.cwd()


def resolve(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A path from a setting: absolute (or ``~``) as given, relative ones under the working root,
    never under the current directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(root).resolve() if root is not None else home()) / p


def relative(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` relative to the working root (POSIX form) when inside it, else as given, so
    summaries and messages hold no machine paths for what lives under the root."""
    base = Path(root).resolve() if root is not None else home()
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


FOLDER_NAME = "a single folder name (no '/' or '\\', not starting with '.', not empty)"


def folder_name(setting: str, value: Any) -> str:
    """``value`` when it names one folder (a run's name); else :class:`SettingsError` naming ``setting``:
    a path there would put the run, and what overwriting it deletes, outside the working root."""
    if not isinstance(value, str) or not value.strip() or value.startswith(".") or any(c in value for c in "/\\\0"):
        raise SettingsError(f"{setting}={value!r} must be {FOLDER_NAME}")
    return value


def inside_home(path: str | os.PathLike, setting: str, root: str | os.PathLike | None = None) -> Path:
    """``path`` (:func:`resolve`d) when it lies under the working root, links followed; else
    :class:`SettingsError` naming ``setting``: nothing outside the root is this package's to write or delete."""
    base = Path(root).resolve() if root is not None else home()
    full = resolve(path, base)
    if not full.resolve().is_relative_to(base):
        raise SettingsError(f"{setting}: {str(path)!r} resolves to {full.resolve()}, outside the working root {base}; "
                            "name a folder under it")
    return full


def mirror() -> Path | None:
    """The offline source root ``$NBLIB_MIRROR`` (``gutenberg/``, ``machado/``, ``qa/``, ``tokenizers/``), or ``None``."""
    env = os.environ.get("NBLIB_MIRROR")
    if not env:
        return None
    path = Path(env).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"NBLIB_MIRROR={env!r} is not a folder; point it at an offline data folder laid out like "
            "shared/data (gutenberg/, machado/, qa/, tokenizers/) or unset it to use the network"
        )
    return path


def mirror_state() -> str:
    """``NBLIB_MIRROR`` in words, for messages: unset, set but empty, or the folder."""
    env = os.environ.get("NBLIB_MIRROR")
    if env is None:
        return "NBLIB_MIRROR is not set"
    if not env.strip():
        return "NBLIB_MIRROR is set but empty (NBLIB_MIRROR=''), so no mirror is used"
    return f"NBLIB_MIRROR={env}"


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes under the working root."""

    home: Path

    @cached_property
    def raw(self) -> Path:
        return self.home / "data" / "raw"

    @cached_property
    def processed(self) -> Path:
        return self.home / "data" / "processed"

    @cached_property
    def corpus(self) -> Path:
        return self.processed / "corpus"

    @cached_property
    def dialogues(self) -> Path:
        return self.processed / "dialogues"

    @cached_property
    def tokens(self) -> Path:
        return self.processed / "tokens"

    @cached_property
    def runs(self) -> Path:
        return self.home / "runs"

    @cached_property
    def reports(self) -> Path:
        return self.home / "reports"

    def run(self, name: str, seed: int | None = None) -> Path:
        """The folder of run ``name`` (``runs/<name>``), or of one of its seeds (``runs/<name>/seed-<seed>``)."""
        return self.runs / name if seed is None else self.runs / name / f"seed-{seed}"


def paths(root: str | os.PathLike | None = None) -> Paths:
    """Paths under ``root`` (default: :func:`home`)."""
    return Paths(Path(root).resolve() if root is not None else home())


def parse_params(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (command-line ``-p``) to overrides; each value is read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"parameter {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:  # e.g. a !!python/... tag: safe_load builds no Python objects
            raise SettingsError(f"parameter {item!r}: the value is not plain YAML data "
                                f"({getattr(e, 'problem', None) or ' '.join(str(e).split())[:160]})") from None
    return out


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}  # no permission, read-only, full, quota


def unwritable(e: OSError) -> str:
    """An :data:`UNWRITABLE` error in words: the file (or the working root, when the error names none) and the fix."""
    where = e.filename or f"the working root {home()}"
    fix = ("free space on its disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "give this user write access to it")
    return f"{where}: {e.strerror}; {fix}, or choose another working root (NBLIB_HOME, --home)"


def python_command() -> str:
    """This interpreter as the user's shell reaches it, for the commands the project prints: ``python``
    when the first ``python`` on ``PATH`` is this one (an activated venv, Kaggle), else its path,
    relative to the current folder when under it (``.venv/bin/python`` after ``make pipeline``)."""
    import shlex
    import shutil

    here = Path(sys.executable).absolute()
    found = shutil.which("python")
    if found and Path(found).absolute().parent == here.parent:
        return "python"
    try:
        return shlex.quote(str(here.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(here))


def cli(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command's ``main`` that prints a user's mistake as one message on stderr and exits 2 (as
    argparse does for bad arguments), not a traceback: settings (:class:`SettingsError`), an earlier
    stage's output that is missing (:class:`MissingInput`) and a GPU the installation cannot serve
    (``machine.HardwareError``, the 8-bit refusal among them), a damaged file or diverged run
    (:class:`UserError`), and a working root that cannot be written (read-only, full); an interrupt exits
    130, also without one."""
    spec = main.__globals__.get("__spec__")  # its module's import name, also when run as __main__ by -m
    command = "python -m " + (spec.name if spec else main.__module__).removesuffix(".__main__")

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        from nblib.machine import HardwareError  # here: torch loads with the command, not with config

        try:
            return main(argv)
        except (SettingsError, MissingInput, HardwareError, UserError) as e:
            print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever it quotes
            return 2
        except OSError as e:
            if e.errno not in UNWRITABLE:
                raise
            print(f"{command}: error: {unwritable(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what was saved is said where it was saved
            print(f"{command}: interrupted", file=sys.stderr)
            return 130

    return run


def stage_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every training stage shares: ``--profile``, ``--seed`` and ``-p KEY=VALUE``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--profile", default="auto", help="smoke, full, dry-run or auto")
    parser.add_argument("--seed", type=int, help="the seed to train (default: the first of `seeds`)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a setting; VALUE is read as YAML")
    return parser


def stage_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The ``-p`` settings of a :func:`stage_arguments` command line; a malformed one is a usage error."""
    try:
        return parse_params(args.param)
    except ValueError as e:
        parser.error(str(e))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
