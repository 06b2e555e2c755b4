"""Label values a user controls (config, split, metric and layer names): bounded in length, credentials redacted.

Prometheus keeps every label value of every series in memory and on disk, and whoever can scrape a target reads
them: a value is cut to ``MAX_VALUE`` characters (with a hash of the whole, so two long names stay apart), and
config keys that look like credentials publish ``REDACTED`` instead of their value.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

MAX_VALUE = 120
REDACTED = "<redacted>"
# scheme://user:password@ : the scheme and user are kept, the password goes.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@")

_LABEL_NAME_BAD = re.compile(r"[^a-z0-9_]")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Words of a key (split at separators and camelCase) that mark a credential. Whole words only: `max_tokens`,
# `num_keys` and `author` are ordinary config.
_CREDENTIAL_WORDS = frozenset((
    "token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "key", "apikey", "accesskey",
    "secretkey", "privatekey", "credential", "credentials", "auth", "authorization", "cookie", "private",
    "signature", "bearer", "dsn", "sas",
))
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def bounded(value: str, limit: int = MAX_VALUE) -> Tuple[str, bool]:
    """``value`` cut to ``limit`` characters, ending in a hash of the whole when cut; and whether it was."""
    if len(value) <= limit:
        return value, False
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return value[:limit - 9] + "~" + digest, True


def without_url_password(value: str) -> str:
    """``value`` with the password of any URL in it (``postgresql://user:secret@host``) redacted: a database or
    broker URL carries its credential in the value, whatever its key is called."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)


def looks_like_credential(key: str) -> bool:
    """Whether a (flattened) config key names a credential: ``api_token``, ``wandb_api_key``, ``dbPassword``."""
    return any(word.lower() in _CREDENTIAL_WORDS for word in _WORDS.findall(key))


def _patterns(name: str, value: Optional[Iterable[str]]) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"TrainingExporter(): {name} must be a list of key patterns such as ['lr', 'optim_*'], "
                        f"got {value!r}")
    return tuple(value)


def _text(value: Any) -> str:
    """A config value as a label value; a tensor by its number (``3.0``), not its repr (``tensor(3.)``)."""
    if callable(getattr(value, "detach", None)) and callable(getattr(value, "tolist", None)):  # a torch.Tensor
        value = value.detach().cpu()
        if value.numel() != 1:
            return str(value.tolist())
        number = value.item()
        if value.is_floating_point() and value.element_size() < 8:
            return str(np.float32(number))  # the shortest text of a float32: 0.1, not 0.10000000149011612
        return str(number)
    return str(value)


class ConfigLabels:
    """Turns a run's config into ``config_<key>`` labels of ``training_run_info``.

    Nested mappings are flattened with ``_``. A key matching a ``deny`` pattern (``fnmatch``, on the flattened key)
    or looking like a credential is published as ``REDACTED`` unless it matches an ``allow`` pattern; deny wins.
    """

    def __init__(self, allow: Optional[Iterable[str]] = None, deny: Optional[Iterable[str]] = None,
                 limit: int = 32) -> None:
        self.allow = _patterns("config_allow", allow)
        self.deny = _patterns("config_deny", deny)
        self.limit = limit

    def redacts(self, key: str) -> bool:
        if any(fnmatch.fnmatchcase(key, p) for p in self.deny):
            return True
        return looks_like_credential(key) and not any(fnmatch.fnmatchcase(key, p) for p in self.allow)

    def labels(self, config: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, str], int]:
        """The labels, at most ``limit``; returns (labels, items dropped or cut)."""
        if config is None:
            return {}, 0
        if not isinstance(config, Mapping):
            raise TypeError(f"TrainingExporter(): config must be a mapping, got {type(config).__name__}")
        flat: List[Tuple[str, Any]] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}_{k}" if prefix else str(k), v)
            else:
                flat.append((prefix, value))

        walk("", config)
        labels: Dict[str, str] = {}
        cut = max(0, len(flat) - self.limit)
        for key, value in flat[:self.limit]:
            # snake_case, as Prometheus label names are written (`promtool check metrics` says so).
            name, name_cut = bounded("config_" + _LABEL_NAME_BAD.sub("_", _CAMEL.sub("_", key).lower()))
            name = name.replace("~", "_")  # the hash suffix's
            if name in labels:  # `lr` and `LR`, `a-b` and `a_b`: one label; the later key is dropped
                cut += 1
                continue
            text, value_cut = bounded(REDACTED if self.redacts(key) else without_url_password(_text(value)))
            labels[name] = text
            cut += name_cut or value_cut
        return labels, cut
