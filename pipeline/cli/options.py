"""What every command does with its common flags: the settings (``--state-dir``,
``--meters``, ``--plans``, ``--broker`` over ``METERSTREAM_*``) and a private state dir."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterstream.cli.statedir import make_private, notice
from meterstream.settings import Settings, load_settings


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    """The settings, with the command's common flags over the environment."""
    overrides: dict[str, Any] = dict(extra)
    if getattr(args, "state_dir", None):
        overrides["state_dir"] = Path(args.state_dir)
    if getattr(args, "meters", None):
        overrides["meters_file"] = Path(args.meters)
    if getattr(args, "plans", None):
        overrides["plans_file"] = Path(args.plans)
    if getattr(args, "broker", None):
        overrides["embedded_broker"] = args.broker
    return load_settings(**overrides)


def private_state_dir(settings: Settings) -> None:
    """Tighten a state dir made earlier with looser modes (see pipeline/cli/statedir.py)."""
    line = notice(settings.state_dir, make_private(settings.state_dir))
    if line:
        print(line, file=sys.stderr, flush=True)


def command_group(sub: Any, name: str, help_text: str) -> Any:
    """``meterstream NAME ...``: a command with subcommands (the chosen one in
    ``args.NAME_command``); returns the subparsers to add them to."""
    group = sub.add_parser(name, help=help_text)
    return group.add_subparsers(dest=f"{name}_command", required=True)


#: How a command group finds its settings from the parsed arguments (cli/main.py's).
SettingsOf = Callable[[argparse.Namespace], Settings]


def group_parent(
    common: argparse.ArgumentParser, settings_of: SettingsOf
) -> argparse.ArgumentParser:
    """The parent parser of a command group's subcommands: the common options, and the
    settings found by ``settings_of`` (``args.settings_of(args)``)."""
    base = argparse.ArgumentParser(add_help=False, parents=[common])
    base.set_defaults(settings_of=settings_of)
    return base
