"""The front door shared by the four commands: run, evaluate, judge and report.

Each is a Hydra app on a primary config in ``aisp_bench/conf`` (``config.yaml``,
``evaluate.yaml``, ``judge.yaml``, ``report.yaml``): one override syntax, ``results_dir``
and, for the three that read runs, the ``select`` block (``conf/app.yaml``). Bad input ends
a command with one ``error:`` line and exit code 2: ``launch`` composes and checks
(``validate.check``) every config the command line asks for before Hydra writes anything
(a bad override, key or value alike; a sweep's before its first job); ``run_app`` does the
same for what the command itself finds (``UserError``, a corrupt run folder). A run that a
SIGTERM stopped ends with one ``stopped:`` line and exit code 143.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from itertools import takewhile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from aisp_bench.config import CONF_DIR, MOVED_KEYS
from aisp_bench.registry import UnknownNameError
from aisp_bench.results import Selection, discover_runs, runs_root
from aisp_bench.rundir import RECORDS, Run, RunFolderError, scan_records
from aisp_bench.runlock import Stopped
from aisp_bench.validate import UserError, check

BAD_INPUT = (UserError, UnknownNameError, RunFolderError)
# Hydra's flags that do not run the command: Hydra answers them itself (``_command_line``)
_HYDRA_ONLY = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "config_path", "config_name",
               "config_dir", "experimental_rerun")  # fmt: skip


def _command_line(argv: Sequence[str]):
    """What ``preflight`` needs of Hydra's command line: the overrides, ``-m``, and whether a flag of
    Hydra's own (``--help``, ``--cfg`` ...; Hydra's documented flags) asks for no run at all."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("overrides", nargs="*")
    for flags in (("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r"),
                  ("--multirun", "-m"), ("--shell-completion", "-sc")):
        parser.add_argument(*flags, action="store_true")
    for flags in (("--cfg", "-c"), ("--package", "-p"), ("--config-path", "-cp"), ("--config-name", "-cn"),
                  ("--config-dir", "-cd"), ("--experimental-rerun",)):
        parser.add_argument(*flags)
    parser.add_argument("--info", "-i", nargs="?", const="all")
    args, _ = parser.parse_known_args(list(argv))  # anything else: Hydra's own error when the app starts
    return args


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Exit(SystemExit):
    """``sys.exit(code)`` that keeps the one line the command printed last (``error: ...``,
    ``stopped: ...``): what a launcher reports for a job that ended so."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.code, self.line = code, line


STOPPED_CODE = 143  # 128 + SIGTERM, as a shell reports a process a SIGTERM ended


def run_app(main: Callable[[DictConfig], int | None], cfg: DictConfig) -> None:
    """Call a command's ``main(cfg)``; bad input: one ``error:`` line, exit 2; a SIGTERM that
    stopped a run: one ``stopped:`` line, exit 143; other codes: exit with them. Warnings are
    printed as one ``warning:`` line each."""
    warnings.formatwarning = lambda msg, *args, **kw: f"warning: {msg}\n"
    try:
        code = main(cfg)
    except BAD_INPUT as e:
        refuse(str(e))
    except Stopped as e:
        _say(f"stopped: {e}", STOPPED_CODE)
    if code:
        sys.exit(code)


def refuse(message: str) -> None:
    _say(f"error: {' '.join(message.split())}", 2)


def _say(line: str, code: int) -> None:
    print(line, file=sys.stderr)
    raise Exit(code, line)


ARGV_ENV = "AISP_BENCH_ARGV"  # set by a launcher for its jobs: the command line that submitted them


def command_line() -> list[str]:
    """The user's command line: the submitting one for a job a launcher started, else ``sys.argv``."""
    try:
        argv = json.loads(os.environ.get(ARGV_ENV) or "null")
    except ValueError:
        argv = None
    return [str(a) for a in argv] if isinstance(argv, list) else list(sys.argv)


def launch(app: Callable[[], None], config_name: str) -> None:
    """A command's entry point: ``preflight`` on the command line, then the Hydra app ``app``."""
    preflight(config_name, sys.argv[1:])
    app()


def preflight(config_name: str, argv: Sequence[str]) -> None:
    """Compose and ``validate.check`` every config the command line asks for: a sweep's every value
    of each swept key at least once (the others at their first value), the config's sweeper params
    included. Hydra's own flags (``--help``, ``--cfg`` ...) are left to Hydra."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = _command_line(argv)
    if any(getattr(args, flag, None) for flag in _HYDRA_ONLY):
        return
    try:
        parsed = _parse_overrides(args.overrides)
        _refuse_key_deletions(parsed)
        refuse_moved_keys(parsed)
        first = _sweep_jobs(parsed)[0] if args.multirun else list(args.overrides)
        cfg, params = compose_config(config_name, first)
        check(cfg)
        if args.multirun:
            given = {o.get_key_element() for o in parsed}
            parsed += _parse_overrides([f"{k}={v}" for k, v in params.items() if k not in given])
            for overrides in _sweep_jobs(parsed):
                if overrides != first:
                    check(compose_config(config_name, overrides)[0])
    except BAD_INPUT as e:
        refuse(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        refuse(hydra_message(e))
    finally:
        GlobalHydra.instance().clear()


def _parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's ``Override`` objects, one bad override named."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, out = OverridesParser.create(), []
    for text in overrides:
        try:
            out += parser.parse_overrides([text])
        except OverrideParseException as e:
            raise UserError(f"bad override {text!r}: {first_line(e)}") from None
    return out


def _refuse_key_deletions(parsed: Sequence[Any]) -> None:
    """``~key`` would leave the command without a key it reads: refused (a group, ``~group``, and
    Hydra's own ``~hydra...`` keys stay Hydra's business)."""
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() and key.split(".")[0] != "hydra" and not Path(CONF_DIR, *key.split(".")).is_dir():
            raise UserError(f"{o.input_line!r} deletes {key}, which the command reads: set it instead ({key}=...)")


def refuse_moved_keys(parsed: Sequence[Any]) -> None:
    """An override of a key that moved to the tuning block (``config.MOVED_KEYS``) is refused
    with its new name (Hydra would only say that the key is not in the config)."""
    for o in parsed:
        key = o.key_or_group
        new = MOVED_KEYS.get(key.removeprefix("gold_"))
        if new:
            full = " (reward.share_prefix=false: engine.reward_attention=full)" if key.endswith("share_prefix") else ""
            raise UserError(f"{key} is now {new}, in the engine tuning block (conf/engine.yaml){full}")


def _sweep_jobs(parsed: Sequence[Any]) -> list[list[str]]:
    """Override lists that try every value of every swept key once (``glob`` sweeps: left to Hydra)."""
    fixed, sweeps = [], []
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        try:
            sweeps.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        except Exception:  # noqa: BLE001 - glob etc.
            continue
    base = [values[0] for values in sweeps]
    jobs = [fixed + base]
    for i, values in enumerate(sweeps):
        jobs += [fixed + base[:i] + [v] + base[i + 1 :] for v in values[1:]]
    return jobs


def compose_config(config_name: str, overrides: Sequence[str]) -> tuple[DictConfig, dict]:
    """(the config the command's ``main`` would get, the config's sweeper params), composed with
    Hydra's compose API; ``${hydra:...}`` stays resolvable."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else {}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, params


def hydra_message(e: BaseException) -> str:
    """Hydra's multi-line composition errors in one line (a group's known options kept)."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    text = next((ln for ln in lines if ln), type(e).__name__).rstrip(".")
    for i, ln in enumerate(lines):
        if ln.startswith("Available options in"):
            listed = takewhile(lambda x: not x.startswith("Config search path"), lines[i + 1 :])
            options = [x for x in listed if x]
            text += f"; {ln[0].lower()}{ln[1:].rstrip(':')}: {', '.join(options)}"
        elif ln.startswith("To append to your config"):
            text += f"; {ln[0].lower()}{ln[1:]}"
    if text.startswith("Ambiguous value"):
        text += "; a list is written key=[a,b], a sweep needs -m"
    if e.__cause__ is not None and str(e.__cause__).strip():
        text += f" ({first_line(e.__cause__)})"
    return text


def instantiate_node(node: DictConfig, what: str) -> Any:
    """``hydra.utils.instantiate(node)``; a constructor's refusal becomes a one-line ``UserError``."""
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:  # Hydra wraps constructor errors; show the cause in one line
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UserError(f"{what}: {first_line(cause)}") from None


def engine_options(engine: DictConfig) -> dict[str, Any]:
    """The ``Engine``'s tuning arguments from the configs' ``engine:`` block (conf/engine.yaml)."""
    return {k: engine[k] for k in ("decode_step", "attention", "sync_every")}


def reward_node(node: DictConfig, engine: DictConfig) -> DictConfig:
    """A reward's config with the ``engine:`` block's ``reward_attention`` as its ``attention``
    where the reward scores with a decoder (``DecoderReward``); any other reward's as it is."""
    from hydra.utils import get_class

    from aisp_bench.rewards.base import DecoderReward

    try:
        decoder = issubclass(get_class(str(node._target_)), DecoderReward)
    except Exception:  # noqa: BLE001 - a bad _target_: instantiate_node names it
        return node
    if not decoder:
        return node
    out = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    out.attention = str(engine.reward_attention)
    return out


def select_runs(cfg: DictConfig, *, allow_none: bool = False) -> list[Run]:
    """The runs under ``cfg.results_dir`` that ``cfg.select`` picks, each read (a corrupt manifest,
    summary or records file is a ``RunFolderError``); none is a ``UserError`` unless ``allow_none``."""
    select = Selection.from_mapping(OmegaConf.to_container(cfg.select, resolve=True))
    runs = discover_runs(cfg.results_dir, select)
    if not runs and not allow_none:
        where = f" for {select.describe()}" if select.describe() else ""
        raise UserError(f"no run folders under {runs_root(cfg.results_dir)}{where}")
    for run in runs:  # a corrupt manifest, summary or records file: refused before anything is written
        _ = run.manifest, run.summary
        if run.shards is not None:
            _ = run.shards.records  # parsed once and cached (a sharded summary reads them too)
        elif (run.path / RECORDS).is_file():
            scan_records(run.path / RECORDS)
    return runs
