"""The settings ``notebook-fabric run`` hands to the ``Fabric()`` inside the script.

The command line exports ``NOTEBOOK_FABRIC_ACCELERATOR``, ``_STRATEGY``, ``_DEVICES``,
``_NUM_NODES`` and ``_PRECISION`` (only those it decides); every rank inherits them and the
connector passes its constructor arguments through :func:`apply_cli_settings`, where the command
line wins. No torch import here: the CLI and the connector both use this module.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, MutableMapping, Union

#: the Fabric constructor arguments the command line can set, in ``--help`` order
SETTINGS = ("accelerator", "strategy", "devices", "num_nodes", "precision")
_PREFIX = "NOTEBOOK_FABRIC_"
_MISSING = object()

Devices = Union[int, str, list[int]]


def env_name(key: str) -> str:
    """``"num_nodes"`` -> ``"NOTEBOOK_FABRIC_NUM_NODES"``."""
    return _PREFIX + key.upper()


def flag_name(key: str) -> str:
    """``"num_nodes"`` -> ``"--num-nodes"``: how the user spelled it on the command line."""
    return "--" + key.replace("_", "-")


def export_cli_settings(settings: Mapping[str, Any], environ: MutableMapping[str, str] = os.environ) -> None:
    """Write ``settings`` (a subset of ``SETTINGS``; ``None`` values skipped) as environment variables."""
    for key, value in settings.items():
        if key not in SETTINGS:
            raise KeyError(f"{key!r} is not a command-line setting; choose from {SETTINGS}")
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(index) for index in value)
        environ[env_name(key)] = str(value)


def parse_devices(text: str, name: str = env_name("devices")) -> Devices:
    """``"2"`` -> 2, ``"-1"`` -> -1, ``"0,1"`` / ``"[0, 1]"`` / ``"0,"`` -> a list, ``"auto"`` -> ``"auto"``."""
    cleaned = text.strip().strip("[]()").strip()
    if cleaned == "auto":
        return "auto"
    try:
        if "," in cleaned:
            return [int(part) for part in cleaned.split(",") if part.strip()]
        return int(cleaned)
    except ValueError:
        raise ValueError(
            f"{name}={text!r} is not understood: use a count like 2, -1 for all, 'auto',"
            " or device indices like 0,1."
        ) from None


def _parse(key: str, text: str) -> Any:
    name = env_name(key)
    if key == "devices":
        return parse_devices(text, name)
    if key == "num_nodes":
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name}={text!r} must be a whole number of nodes, at least 1.")
        return value
    if not text.strip():
        raise ValueError(f"{name} is set but empty; unset it or give a value.")
    return text.strip()


def read_cli_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The settings the command line exported, parsed to Python values (unset ones left out)."""
    return {key: _parse(key, environ[env_name(key)]) for key in SETTINGS if env_name(key) in environ}


def _normalise(key: str, value: Any) -> Any:
    if key == "devices":
        if isinstance(value, str):
            try:
                return parse_devices(value, "devices")
            except ValueError:
                return value
        if isinstance(value, tuple):
            return list(value)
    if key == "precision" and isinstance(value, (str, int)):
        try:
            from .precision import normalize_precision  # the connector has imported torch already

            return normalize_precision(value)
        except (ImportError, ValueError):
            return str(value).lower()
    if key in ("accelerator", "strategy") and isinstance(value, str):
        return value.lower()
    return value


def _describe(value: Any) -> str:
    if value is None or isinstance(value, (str, int, float, list, tuple)):
        return repr(value)
    return f"{type(value).__name__}(...)"


def apply_cli_settings(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the command line's settings into the Fabric constructor's arguments.

    ``given`` holds what the script passed (keys among ``SETTINGS``; others pass through), and
    ``defaults`` the constructor's defaults. A setting the command line exported replaces the
    given value. Where the script asked for something else explicitly (not the default, not
    the command line's value), a ``UserWarning`` on rank 0 names both, e.g.
    ``notebook-fabric run --devices 2 overrides Fabric(devices=4) in your script``.
    Outside ``notebook-fabric run`` (no variables set) ``given`` comes back unchanged.
    """
    result = dict(given)
    for key, cli_value in read_cli_settings().items():
        script_value = given.get(key, _MISSING)
        result[key] = cli_value
        if script_value is _MISSING:
            continue
        default = defaults.get(key, _MISSING)
        if default is not _MISSING and _normalise(key, script_value) == _normalise(key, default):
            continue
        if _normalise(key, script_value) == _normalise(key, cli_value):
            continue
        _warn_override(key, script_value)
    return result


def _warn_override(key: str, script_value: Any) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # one warning per job, not one per rank
    flag, text = flag_name(key), os.environ[env_name(key)]
    message = f"notebook-fabric run {flag} {text} overrides Fabric({key}={_describe(script_value)}) in your script."
    if not isinstance(script_value, (str, int, list, tuple)):
        message += f" The object's own settings are not used; leave out {flag} to keep it."
    else:
        message += f" Remove {key}= from Fabric(...) or change {flag} to silence this."
    warnings.warn(message, UserWarning, stacklevel=3)
