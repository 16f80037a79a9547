"""Configuration: ``[tool.jacaudit]`` in pyproject.toml or a ``jacaudit.toml``.

Precedence: command line > environment (``JACAUDIT_<OPTION>`` or ``JACAUDIT_<COMMAND>_<OPTION>``, e.g.
``JACAUDIT_SALIENCY_METHOD=ig``) > config file > built-in defaults. File and environment are merged into
click's ``default_map``, which the command line overrides.

File layout (keys use the option's name with dashes or underscores)::

    [tool.jacaudit]            # (or the top level of jacaudit.toml)
    device = "cpu"             # applies to every command that has --device
    seed = 0
    [tool.jacaudit.saliency]   # only for `jacaudit saliency`
    method = "ig"
    fail_on = ["mask_outside@method=grad>0.8"]

A key never means two things: only the shared options (:data:`jacaudit.cli.options.SHARED_KEYS`: same name, same
meaning in every command) may stand at the top level or in ``JACAUDIT_<OPTION>``; a command's own options
(``--method``, ``--ig-steps``, thresholds, ``--out``...) go in its table or ``JACAUDIT_<COMMAND>_<OPTION>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import InputError

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]


def find_config(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest jacaudit.toml, or pyproject.toml with a [tool.jacaudit] table, from ``start`` upwards."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        cand = d / "jacaudit.toml"
        if cand.is_file():
            return cand
        pp = d / "pyproject.toml"
        if pp.is_file():
            try:
                data = _toml.loads(pp.read_text(encoding="utf-8"))
            except Exception:
                data = {}
            if "jacaudit" in data.get("tool", {}):
                return pp
        if (d / ".git").exists():
            break
    return None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        data = _toml.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file not found: {p}") from None
    except Exception as e:
        raise InputError(f"cannot parse config file {p}: {e}") from None
    if p.name == "pyproject.toml" or isinstance(data.get("tool"), dict):
        data = data.get("tool", {}).get("jacaudit", {})
    if not isinstance(data, dict):
        raise InputError(f"{p}: [tool.jacaudit] must be a table")
    return data


def cmd_params(cmd) -> dict[str, Any]:
    return {p.name: p for p in cmd.params if p.name}


def _env_value(name: str, value: str, params: dict[str, Any]) -> Any:
    """A multiple option (--fail-on) from one environment string: split on ';'."""
    p = params.get(name)
    if p is not None and getattr(p, "multiple", False):
        return [s.strip() for s in value.split(";") if s.strip()]
    return value


def _key(k: str) -> str:
    return k.replace("-", "_").lower()


def _aliases(cmd) -> dict[str, str]:
    """Accepted config/env keys -> click parameter name: the parameter's own name and its long option names."""
    out: dict[str, str] = {}
    for p in cmd.params:
        if not p.name:
            continue
        out[_key(p.name)] = p.name
        for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            if o.startswith("--"):
                out[_key(o[2:])] = p.name
    return out


_SOURCES: dict[tuple[str, str], str] = {}


def option_source(command: str, name: str) -> str:
    """Where a command's option value came from: cli (or its default), config or env."""
    return _SOURCES.get((command, name), "cli")


def default_map(config: dict[str, Any], commands: dict[str, Any],
                environ: dict[str, str] | None = None,
                shared: frozenset[str] | set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Click ``default_map`` from the config file and the environment.

    Global keys go to every command having that option, ``[<command>]`` tables to that command only; the
    environment (``JACAUDIT_<OPTION>`` for every command, ``JACAUDIT_<COMMAND>_<OPTION>`` for one) overrides
    the file. Unknown keys in the file are an error (a typo must not pass silently).
    """
    aliases = {name: _aliases(cmd) for name, cmd in commands.items()}
    known = set().union(*aliases.values()) if aliases else set()
    globals_ = {_key(k): v for k, v in config.items() if not isinstance(v, dict)}
    unknown = [k for k in globals_ if k not in known]
    if unknown:
        raise InputError(f"config: unknown option(s) {', '.join(sorted(unknown))}")
    if shared is not None:
        own = sorted(k for k in globals_ if k not in shared)
        if own:
            where = {k: sorted(n for n, al in aliases.items() if k in al) for k in own}
            hint = "; ".join(f"{k} -> [{' or '.join(v)}]" for k, v in where.items())
            raise InputError(f"config: {', '.join(own)} is a command's own option, not shared by every command; "
                             f"put it in the command's table ({hint})")
    for k, v in config.items():
        if isinstance(v, dict) and k not in aliases:
            raise InputError(f"config: unknown command table [{k}]")
    env = {k[len("JACAUDIT_"):].lower(): v for k, v in (environ if environ is not None else os.environ).items()
           if k.startswith("JACAUDIT_")}
    out: dict[str, dict[str, Any]] = {}
    for name, al in aliases.items():
        dm = {al[k]: v for k, v in globals_.items() if k in al}
        table = config.get(name)
        if isinstance(table, dict):
            for k, v in table.items():
                if _key(k) not in al:
                    raise InputError(f"config: `jacaudit {name}` has no option {k!r}")
                dm[al[_key(k)]] = v
        for k in dm:
            _SOURCES[(name, k)] = "config"
        prefix = _key(name) + "_"
        for k, v in env.items():
            if k in al and k not in ("threads", "debug", "quiet", "config") and (shared is None or k in shared):
                dm[al[k]] = v
                _SOURCES[(name, al[k])] = "env"
        for k, v in env.items():
            if k.startswith(prefix) and k[len(prefix):] in al:
                dm[al[k[len(prefix):]]] = _env_value(al[k[len(prefix):]], v, cmd_params(commands[name]))
                _SOURCES[(name, al[k[len(prefix):]])] = "env"
        if dm:
            out[name] = dm
    return out
