"""Recipe plumbing shared by every stage: YAML -> dict, ``--set a.b=c`` overrides, dict -> config dataclass with
unknown keys reported against the known ones, and secret redaction for anything written to logs, manifests or cards.

Recipes are the user interface (litgpt-style YAML); each stage owns its config dataclass, this module only moves data.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable


class ConfigError(Exception):
    """A mistake in a recipe or an override; its message names the file, the field and what is allowed."""


def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's float rule: PyYAML follows YAML 1.1, where ``3e-4`` (no dot) is a
    string, and a learning rate written that way would fail validation or, worse, be compared as text."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe is a folder, not a YAML file: {path}") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with ``c`` parsed as YAML (so numbers, booleans, lists work)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.load(raw, Loader=_yaml_loader()) if raw.strip() else ""  # noqa: S506 - SafeLoader
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(data: dict[str, Any], keys: list[str], value: Any, resolve=None) -> None:
    """Set ``data[k1][k2]... = value``; ``resolve(node, key)`` may map a key to a list index (e.g. a step by name)."""
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = resolve(node, key) if resolve else None
            if index is None:
                try:
                    index = int(key)
                except ValueError:
                    raise ConfigError(f"--set {'.'.join(keys)}: no list item {key!r}") from None
            if not 0 <= index < len(node):
                raise ConfigError(f"--set {'.'.join(keys)}: index {index} out of range (0..{len(node) - 1})")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping or list")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested_dataclass(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with clear errors: unknown keys listed with the known ones, missing required fields named,
    and validation errors from ``__post_init__`` prefixed with ``where`` (file and section)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        nested = _nested_dataclass(hints.get(name))
        kwargs[name] = build_dataclass(nested, value, f"{where}.{name}") if nested and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


# A key names a secret when its last word does (hf_token, api_key, client_secret, password); special-token settings
# (pad_token...) and words that merely contain one (max_new_tokens, tokenizer, author) are ordinary settings, and
# hiding them would also hide them from run fingerprints.
_SECRET_KEY = re.compile(r"^(?!(?:pad|eos|bos|unk|sep|cls|mask)_token$)(?:.*[_-])?"
                         r"(?:token|secret|password|passwd|api[_-]?key|apikey|credentials?|auth)$", re.IGNORECASE)
REDACTED = "<redacted>"


def load_config(cls: type, path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """``cls`` from the YAML recipe at ``path`` with ``--set key=value`` overrides applied; errors name the file and
    the key. One loader for every command that reads a recipe into a config dataclass."""
    data = load_yaml(Path(path))
    for item in overrides:
        keys, value = parse_override(item)
        set_path(data, keys, value)
    return build_dataclass(cls, data, str(path))


def redact_secrets(obj: Any) -> Any:
    """A copy of ``obj`` with the values of secret-looking keys replaced, for manifests, logs and cards."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secret values hidden: ``--set hub.token=abc`` and ``--token abc`` alike."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        key, sep, _ = arg.partition("=")
        if sep and _SECRET_KEY.search(key.lstrip("-").rsplit(".", 1)[-1]):
            out.append(f"{key}={REDACTED}")
        elif arg.startswith("--") and _SECRET_KEY.search(arg.lstrip("-")):
            out.append(arg)
            hide_next = True
        else:
            out.append(arg)
    return out
