"""Where configuration values come from: YAML files and ``APBATCH_*`` variables, merged.

Plain mappings only; `apbatch.config.load_config` validates the merged result against the
models. Every failure here is a `BadInputError` of one line naming ``--config`` (and the file)
or the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from .errors import BadInputError

__all__ = ["ConfigModel", "deep_merge", "env_overrides", "read_secret_file", "read_yaml"]


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, section by section (nested mappings merged, not replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``APBATCH_SECTION__FIELD=value`` -> ``{"section": {"field": value}}``.

    A value that YAML reads as a list, a mapping or ``null`` is taken as such; any other stays
    the string it is, for pydantic to convert to the field's type (YAML 1.1 would turn
    ``01:00:00`` into 3600 and ``010`` into 8).

    Raises
    ------
    BadInputError
        Raised if one variable names a section another sets as a value.
    """
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("APBATCH_") or key == "APBATCH_CONFIG":
            continue
        parts = key[len("APBATCH_"):].lower().split("__")
        if len(parts) == 1 and parts[0] != "root":
            continue  # not a config field (e.g. a secret like APBATCH_KAFKA_PASSWORD)
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError):
            value = raw
        if value is not None and not isinstance(value, list | dict):
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadInputError(key, f"{part} is a value, not a section",
                                    "drop one of the two APBATCH_* variables")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as a mapping; every failure is one line naming ``--config`` and the file."""
    fix = "pass a UTF-8 YAML file holding a mapping of sections, like config/*.yaml"
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BadInputError("--config", f"no such file {str(path)!r}", "check the path") from None
    except UnicodeDecodeError:
        raise BadInputError("--config", f"{path} is not UTF-8 text (a binary file?)", fix) from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError("--config", f"{path} is not valid YAML: {first}", fix) from None
    except RecursionError:
        raise BadInputError("--config", f"{path} is nested too deeply", fix) from None
    except OSError as exc:
        raise BadInputError("--config", f"cannot read {path}: {exc.strerror or exc}", fix) from None
    if not isinstance(loaded, dict):
        raise BadInputError("--config", f"{path} must hold a mapping of sections", fix)
    return loaded


class ConfigModel(BaseModel):
    """Base of every configuration section: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret_file(field: str, path: str | Path, root: str | Path | None = None) -> str:
    """The secret held in a file (a password, a token): its text, stripped.

    Parameters
    ----------
    field : `str`
        The config field that names the file (for the error message), e.g. ``kafka.password_file``.
    path : `str` or `~pathlib.Path`
        The file; a relative path is resolved against ``root`` when given.
    root : `str` or `~pathlib.Path`, optional
        Directory relative paths are resolved against (the config's ``root``).

    Raises
    ------
    BadInputError
        Raised, naming ``field``, if the file cannot be read or holds only white space.
    """
    file = Path(path)
    if root is not None and not file.is_absolute():
        file = Path(root) / file
    try:
        secret = file.read_text().strip()
    except OSError as exc:
        raise BadInputError(field, f"cannot read {str(file)!r}: {exc.strerror}",
                            "check the path and its permissions") from None
    if not secret:
        raise BadInputError(field, f"{str(file)!r} is empty", "write the secret into it")
    return secret
