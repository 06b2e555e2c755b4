"""The body of ``/metrics``: the exporter's own families rendered from cached text, the rest by prometheus_client.

prometheus_client formats every sample of every scrape from scratch (label dicts sorted and escaped, values
formatted): about 7 µs a series, 70 ms for 10,000. The exporter's families are few and their label values rarely
change, so ``FamilyFormat`` keeps each series' rendered ``name{labels} `` and formats only its value at a scrape.
The text is what prometheus_client would write for the same samples, byte for byte, in both formats
(``tests/test_exposition.py`` compares them); ``RenderedFamily.samples`` still gives the samples to whoever reads
them (``registry.get_sample_value``, prometheus_client's own encoders).
"""
from __future__ import annotations

import functools
import operator
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import exposition as client_exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as client_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_EOF = "# EOF\n"
# Escapings that leave names in the legacy character set as they are: the exporter's are all such names.
_NAMES_KEPT = (client_openmetrics.UNDERSCORES, client_openmetrics.ALLOWUTF8)


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class RenderedFamily(Metric):
    """A metric family whose sample lines are already rendered; its ``samples`` are built only when read.

    ``keys`` names the series of ``lines`` in order (one line each, two for a summary).
    """

    def __init__(self, fmt: "FamilyFormat", lines: List[str], keys: Sequence[object],
                 samples: Callable[[], List[Sample]]) -> None:
        # Metric.__init__ would validate the name again and set ``samples``, which is built on demand here.
        self.name, self.documentation, self.type, self.unit = fmt.name, fmt.documentation, fmt.type, ""
        self.format = fmt
        self.lines = lines
        self.keys = keys
        self._make_samples = samples
        self._samples: Optional[List[Sample]] = None

    @property
    def samples(self) -> List[Sample]:  # type: ignore[override]
        if self._samples is None:
            self._samples = self._make_samples()
        return self._samples

    @staticmethod
    def merged(families: Sequence["RenderedFamily"]) -> "RenderedFamily":
        """One family with the series of ``families`` (one name, several exporters sharing a registry); a series
        that several of them serve (one run and rank twice) comes from the first that does."""
        seen: set = set()
        lines: List[str] = []
        parts: List[Tuple[RenderedFamily, int]] = []
        for family in families:
            n = len(family.format.sample_names)
            for i, key in enumerate(family.keys):
                series = (family.format.base, key)
                if series not in seen:
                    seen.add(series)
                    lines.extend(family.lines[i * n:(i + 1) * n])
                    parts.append((family, i))
        n = len(families[0].format.sample_names)
        return RenderedFamily(families[0].format, lines, [(f.format.base, f.keys[i]) for f, i in parts],
                              lambda: [s for f, i in parts for s in f.samples[i * n:(i + 1) * n]])


class FamilyFormat:
    """How one family is written: its headers in both formats, and the rendered label part of each series.

    ``base`` holds the values of the first label names (the run and rank); ``render`` takes the values of the
    others as a tuple, a single string, or ``()`` for a family without them.
    """

    def __init__(self, name: str, documentation: str, typ: str, labelnames: Sequence[str],
                 base: Tuple[str, ...] = ()) -> None:
        self.type = typ
        # prometheus_client names a counter family without its _total and its sample with it.
        self.name = name[:-len("_total")] if typ == "counter" and name.endswith("_total") else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.base = tuple(base)
        if typ == "counter":
            self.sample_names: Tuple[str, ...] = (self.name + "_total",)
        elif typ == "summary":
            self.sample_names = (self.name + "_count", self.name + "_sum")
        else:
            self.sample_names = (self.name,)
        text_name = self.sample_names[0] if typ == "counter" else self.name
        help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
        self.text_header = f"# HELP {text_name} {help_text}\n# TYPE {text_name} {typ}\n"
        self.openmetrics_header = f"# HELP {self.name} {_label_value(documentation)}\n# TYPE {self.name} {typ}\n"
        self._label_order = sorted(range(len(self.labelnames)), key=self.labelnames.__getitem__)
        self._prefixes: Dict[object, Tuple[str, ...]] = {}
        self._last: Optional[Tuple[Mapping[object, object], List[str], List[object]]] = None

    def _labels(self, key: object) -> Tuple[str, ...]:
        return self.base + (key if isinstance(key, tuple) else (key,))

    def _prefix(self, key: object) -> Tuple[str, ...]:
        """``name{labels} `` of each sample of the series ``key``: escaped and sorted once, reused every scrape."""
        values = self._labels(key)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for labels {self.labelnames}")
        inner = ",".join(f'{self.labelnames[i]}="{_label_value(values[i])}"' for i in self._label_order)
        labels = "{" + inner + "}" if inner else ""
        prefix = tuple(f"{name}{labels} " for name in self.sample_names)
        self._prefixes[key] = prefix
        return prefix

    def render(self, values: Mapping[object, object]) -> RenderedFamily:
        """The family with one series per item of ``values`` (a number, or ``(count, sum)`` for a summary), in
        the order of their keys; ``values`` must not change afterwards (its samples are built from it on demand).

        A value that is the same object as at the last render keeps its line (the caller's copies share the
        objects of values that did not change), so only new values are formatted.
        """
        last = self._last  # (values, lines, sorted keys) of the last render, read once: renders may run at once
        same_keys = last is not None and values.keys() == last[0].keys()
        keys = last[2] if same_keys else sorted(values)
        if same_keys and all(map(operator.is_, values.values(), last[0].values())):
            return RenderedFamily(self, last[1], keys, functools.partial(self._samples, values, keys))
        prefixes = self._prefixes
        lines: List[str] = []
        if self.type == "summary":
            for key in keys:
                count, total = values[key]
                count_prefix, sum_prefix = prefixes.get(key) or self._prefix(key)
                lines.append(f"{count_prefix}{floatToGoString(count)}\n")
                lines.append(f"{sum_prefix}{floatToGoString(total)}\n")
        elif same_keys:
            previous = last[0]
            for key, line in zip(keys, last[1]):
                value = values[key]
                if value is not previous[key]:
                    line = f"{(prefixes.get(key) or self._prefix(key))[0]}{floatToGoString(value)}\n"
                lines.append(line)
        else:
            for key in keys:
                lines.append(f"{(prefixes.get(key) or self._prefix(key))[0]}{floatToGoString(values[key])}\n")
        self._last = (values, lines, keys)
        return RenderedFamily(self, lines, keys, functools.partial(self._samples, values, keys))

    def _samples(self, values: Mapping[object, object], keys: List[object]) -> List[Sample]:
        samples = []
        for key in keys:
            value = values[key]
            labels = dict(zip(self.labelnames, self._labels(key)))
            pairs = zip(self.sample_names, value) if self.type == "summary" else ((self.sample_names[0], value),)
            samples.extend(Sample(name, labels, v, None, None, None) for name, v in pairs)
        return samples


class _Families(Collector):
    def __init__(self, families: List[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _encode(registry: Collector, fallback: Callable[[Collector], bytes], openmetrics: bool) -> bytes:
    out: List[str] = []
    others: List[Metric] = []

    def flush() -> None:
        if others:
            text = fallback(_Families(others)).decode("utf-8")
            out.append(text[:-len(_EOF)] if openmetrics and text.endswith(_EOF) else text)
            others.clear()

    for family in registry.collect():
        if isinstance(family, RenderedFamily):
            flush()
            out.append(family.format.openmetrics_header if openmetrics else family.format.text_header)
            out.extend(family.lines)
        else:
            others.append(family)
    flush()
    if openmetrics:
        out.append(_EOF)
    return "".join(out).encode("utf-8")


def choose_encoder(accept: Optional[str]) -> Tuple[Callable[[Collector], bytes], str]:
    """prometheus_client's content negotiation (text 0.0.4 or 1.0.0, OpenMetrics, name escaping) with an encoder
    that copies the text of ``RenderedFamily`` and formats other families as prometheus_client does."""
    fallback, content_type = client_exposition.choose_encoder(accept or "")
    _, named, escaping = content_type.rpartition("escaping=")
    if not named:
        escaping = client_openmetrics.UNDERSCORES
    if escaping not in _NAMES_KEPT:
        return fallback, content_type  # names are rewritten (dots, values): prometheus_client does it all
    openmetrics = content_type.startswith("application/openmetrics-text")
    return functools.partial(_encode, fallback=fallback, openmetrics=openmetrics), content_type
