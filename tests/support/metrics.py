"""Reading the gateway's Prometheus exposition: samples and their values, never the ``# HELP`` text.

A family's HELP and TYPE lines are there whether or not anything was counted, so a check for a
metric's name in the text passes for a gateway that never counted it. These read the samples.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str, name: str, **labels: str) -> list[Sample]:
    """The samples called ``name`` (``gateway_requests_total``, not the family name) whose labels include ``labels``."""
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the samples matching ``name`` and ``labels``, added up (0 when there is none).

    With ``--workers N`` counters are already added up over the workers, and a gauge has one sample
    per worker (a ``pid`` label): their sum is the whole gateway's value.
    """
    return sum(sample.value for sample in samples(text, name, **labels))


def per_worker(text: str, name: str, **labels: str) -> dict[int, float]:
    """A gauge's value in each worker, by pid (with ``--workers N`` every gauge sample carries a ``pid`` label)."""
    return {int(sample.labels["pid"]): sample.value for sample in samples(text, name, **labels)}
