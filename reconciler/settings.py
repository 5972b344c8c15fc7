"""One configuration surface for the services (``hq``, ``relay``, ``agent``).

Every option of a service is a command-line flag with two fallbacks: an
environment variable ``RECONCILER_<FLAG_IN_UPPER_SNAKE>`` (``--poll-interval``
← ``RECONCILER_POLL_INTERVAL``) and a key of the TOML file given with
``--config FILE`` (or ``RECONCILER_CONFIG``), named as the flag without its
dashes (``poll-interval = 30``). Precedence: command line > environment >
config file > the flag's default.

Values from the environment or the file go through the flag's own ``type``
converter and ``choices``, so they are checked exactly as on the command line;
an error names its source (``RECONCILER_POLL_INTERVAL: ...``,
``config /etc/reconciler/relay.toml: ...``) and exits 2 like argparse.

- a repeatable flag (``--label``) takes a list in the file
  (``label = ["dept=sales"]``) and, in the environment, items separated by
  commas or newlines (``RECONCILER_LABEL=dept=sales,site=kanto``); an item
  holding a comma must come from the command line or the file;
- a switch (``--insecure-http``) takes ``true``/``false`` in the file and
  1/true/yes/on or 0/false/no/off in the environment (an empty variable is
  not set, whatever the flag);
- a required flag (``--origin``) may come from either fallback too;
- flags that exclude each other on the command line do so across sources.

Secrets are never values: a secret comes from a file a ``--*-file`` flag
names (``RECONCILER_ENROLL_SECRET_FILE`` names a file too).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "RECONCILER_"
SERVICES = ("hq", "relay", "agent")
CONFIG_FLAG = "--config"
_ATTRIBUTE = "_reconciler_settings"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Unset:
    """The default every service option parses to, so a value given on the command line is told apart."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass
class _Setting:
    action: argparse.Action
    key: str  # the long flag without its dashes: the TOML key
    env: str  # RECONCILER_<KEY IN UPPER SNAKE>
    default: Any
    required: bool
    repeatable: bool
    switch: bool


@dataclass
class _Spec:
    settings: list[_Setting] = field(default_factory=list)


def env_name(flag: str) -> str:
    """``--poll-interval`` -> ``RECONCILER_POLL_INTERVAL``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _long_flag(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


def install(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to a service's parser and give every option its environment fallback.

    Call it once the parser has all its options; :func:`parsing` and
    :func:`resolve` then do the rest around ``parse_known_args``.
    """
    parser.add_argument(CONFIG_FLAG, metavar="F",
                        help="TOML file of settings: keys are the flags without dashes (poll-interval = 30, "
                             "label = [\"dept=sales\"], insecure-http = true); the command line and the "
                             "environment win over it")
    spec = _Spec()
    for action in parser._actions:
        flag = _long_flag(action)
        if flag is None or isinstance(action, argparse._HelpAction):
            continue
        if flag == CONFIG_FLAG:
            action.help = f"{action.help} (env: {env_name(flag)})"
            continue
        repeatable = isinstance(action, argparse._AppendAction)
        switch = isinstance(action, argparse._StoreTrueAction)
        if not (repeatable or switch or type(action) is argparse._StoreAction):
            raise TypeError(f"{flag}: no environment fallback for a {type(action).__name__}")
        setting = _Setting(action, flag[2:], env_name(flag), action.default, action.required, repeatable, switch)
        spec.settings.append(setting)
        # An append action copies its default and appends to the copy: None is its "not given".
        action.default = None if repeatable else UNSET
        action.help = f"{action.help or ''} (env: {setting.env})".lstrip()
    setattr(parser, _ATTRIBUTE, spec)


def _service_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            sub: argparse.ArgumentParser = action.choices[command]
            return sub if hasattr(sub, _ATTRIBUTE) else None
    return None


def _specs(parser: argparse.ArgumentParser) -> Iterator[_Spec]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                spec = getattr(sub, _ATTRIBUTE, None)
                if isinstance(spec, _Spec):
                    yield spec


@contextmanager
def parsing(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Parse with the required service flags optional: :func:`resolve` checks them once the fallbacks are in.

    (argparse would refuse a missing ``--origin`` before the environment or the
    config file could give it; help and usage still show it as required.)
    """
    flipped = [s.action for spec in _specs(parser) for s in spec.settings if s.required]
    for action in flipped:
        action.required = False
    try:
        yield
    finally:
        for action in flipped:
            action.required = True


class SettingError(Exception):
    """A value from the environment or the config file is wrong; the message names its source."""


def _convert(setting: _Setting, parser: argparse.ArgumentParser, raw: str, source: str) -> Any:
    action = setting.action
    converter = action.type
    value: Any = raw
    if converter is not None:
        if not callable(converter):
            raise TypeError(f"--{setting.key}: type {converter!r} is not callable")
        try:
            value = converter(raw)
        except argparse.ArgumentTypeError as e:
            raise SettingError(f"{source}: {e}") from None
        except (TypeError, ValueError):
            name = getattr(converter, "__name__", repr(converter))
            raise SettingError(f"{source}: invalid {name} value: {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        shown = ", ".join(repr(c) for c in action.choices)
        raise SettingError(f"{source}: invalid choice: {value!r} (choose from {shown})")
    return value


def _from_env(setting: _Setting, parser: argparse.ArgumentParser, raw: str) -> Any:
    source = setting.env
    if setting.switch:
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise SettingError(f"{source}: expected 1, true, yes, on, 0, false, no or off, got {raw!r}")
    if setting.repeatable:
        items = [item.strip() for line in raw.splitlines() for item in line.split(",")]
        return [_convert(setting, parser, item, source) for item in items if item]
    return _convert(setting, parser, raw, source)


def _scalar(value: Any, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SettingError(f"{source}: expected a string or a number, got {type(value).__name__} {value!r}")
    return str(value)


def _from_file(setting: _Setting, parser: argparse.ArgumentParser, value: Any, path: str) -> Any:
    source = f"config {path}: {setting.key}"
    if setting.switch:
        if not isinstance(value, bool):
            raise SettingError(f"{source}: expected true or false, got {value!r}")
        return value
    if setting.repeatable:
        items = value if isinstance(value, list) else [value]
        return [_convert(setting, parser, _scalar(item, source), source) for item in items]
    return _convert(setting, parser, _scalar(value, source), source)


def load_config(path: str, known: Mapping[str, _Setting]) -> dict[str, Any]:
    """The settings of a TOML file; :class:`SettingError` naming the file for an unreadable or unknown one."""
    import tomllib  # only a service with a config file pays for it

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingError(f"config {path}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"config {path}: not valid TOML: {e}") from None
    for key in data:
        if key not in known:
            hint = " (keys are the flags without dashes, at the top level)" if isinstance(data[key], dict) else ""
            raise SettingError(f"config {path}: unknown setting {key!r}{hint}")
    return data


def _check_exclusive(parser: argparse.ArgumentParser, args: argparse.Namespace, sources: Mapping[str, str]) -> None:
    """Flags of one mutually exclusive group may not be set together from different sources either.

    (argparse checks only the command line: ``--insecure-unsigned-webhook`` there and
    ``RECONCILER_WEBHOOK_SECRET_FILE`` in the environment would otherwise both hold.)
    """
    for group in parser._mutually_exclusive_groups:
        given = [a for a in group._group_actions
                 if a.dest in sources and getattr(args, a.dest) not in (None, False, [])]
        if len(given) > 1:
            shown = " and ".join(f"{_long_flag(a)} (from {sources[a.dest]})" for a in given)
            raise SettingError(f"{shown} exclude each other")


def fill(parser: argparse.ArgumentParser, args: argparse.Namespace,
         environ: Mapping[str, str] | None = None) -> None:
    """Fill every service option the command line left out from the environment, the config file or its default.

    Exits 2 through ``parser.error`` (the service's parser) naming the source of a bad value, or the
    required flags nobody gave. A command that is not a service is left alone.
    """
    sub = _service_parser(parser, getattr(args, "command", None))
    if sub is None:
        return
    spec: _Spec = getattr(sub, _ATTRIBUTE)
    env = os.environ if environ is None else environ
    missing: list[str] = []
    try:
        config_path: str | None = getattr(args, "config", None) or env.get(env_name(CONFIG_FLAG)) or None
        args.config = config_path
        known = {s.key: s for s in spec.settings}
        config = load_config(config_path, known) if config_path else {}
        sources: dict[str, str] = {}  # dest -> where a value other than the default came from
        for setting in spec.settings:
            dest = setting.action.dest
            value = getattr(args, dest, UNSET)
            if value is not UNSET and not (setting.repeatable and value is None):
                sources[dest] = "the command line"
                continue
            raw = env.get(setting.env)
            if raw:  # an empty variable is not set
                value = _from_env(setting, sub, raw)
                sources[dest] = setting.env
            elif setting.key in config:
                value = _from_file(setting, sub, config[setting.key], config_path or "")
                sources[dest] = f"config {config_path}"
            elif setting.required:
                missing.append(f"--{setting.key}")
                value = None
            else:
                value = list(setting.default) if isinstance(setting.default, list) else setting.default
            setattr(args, dest, value)
        _check_exclusive(sub, args, sources)
    except SettingError as e:
        sub.error(str(e))
    if missing:
        sub.error("the following arguments are required: " + ", ".join(missing)
                  + " (on the command line, from the environment or in --config)")
