"""Every Prometheus metric kvpool exports, read from the metric objects themselves (not from text).

Shared by tests/architecture/test_metrics_doc.py (docs/metrics.md lists exactly these) and
tests/chart/test_dashboard.py (every dashboard query names one of them). Which modules define
metrics is found by parsing the source (any module that imports a metric class of
prometheus_client, or names vLLM's ``KVConnectorPromMetrics``), so a new module with metrics is
seen without editing this file; the names, types and labels come from importing those modules:

- module-level metrics register in prometheus_client's default registry: every ``kvpool_*``
  collector there is taken;
- the connector's series are registered by vLLM's API server through a ``KVConnectorPromMetrics``
  subclass: each such class of kvpool is built here against a private registry, with the labels
  vLLM's ``PrometheusStatLogger`` gives it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import pathlib
import re
import types

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prom

from tests.needs import missing  # loaded by tests/conftest.py (pytest names this package "architecture")

from . import import_cycles

ROOT = pathlib.Path(__file__).resolve().parents[2]
_METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
_VLLM_BASE = "KVConnectorPromMetrics"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
"""The series a histogram exposes under its name (``_created`` too, which nobody queries)."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One exported metric family: ``name`` as PromQL names it (a counter with its ``_total``)."""

    name: str
    type: str  # counter, gauge, histogram, summary, info, enum
    labels: tuple[str, ...]
    help: str
    module: str  # the module that defines it

    def series(self) -> set[str]:
        """The series names a query may use for this family."""
        if self.type in ("histogram", "summary"):
            return {self.name, *(self.name + s for s in HISTOGRAM_SUFFIXES)}
        return {self.name}


def defining_modules() -> list[str]:
    """kvpool modules whose source constructs prometheus_client metrics or a vLLM connector's."""
    found = []
    for name, path in sorted(import_cycles.modules(ROOT).items()):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imports_classes = (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("prometheus_client")
                and any(a.name in _METRIC_CLASSES for a in node.names)
            )
            plain_import = isinstance(node, ast.Import) and any(
                a.name == "prometheus_client" for a in node.names
            )
            vllm_class = isinstance(node, ast.Name | ast.alias) and _VLLM_BASE in (
                getattr(node, "id", None),
                getattr(node, "name", None),
            )
            if imports_classes or plain_import or vllm_class:
                found.append(name)
                break
    return found


def _exposed_name(wrapper: prom.MetricWrapperBase) -> str:
    # prometheus_client strips a counter's "_total" from the family and adds it back to the sample
    return f"{wrapper._name}_total" if wrapper._type == "counter" else wrapper._name


def _from_registry(registry: CollectorRegistry, module_of: dict[str, str]) -> list[Metric]:
    # No public API lists a metric's label names; _labelnames / _collector_to_names are the only
    # place they are kept (prometheus_client 0.2x).
    out = []
    for collector in list(registry._collector_to_names):
        if isinstance(collector, prom.MetricWrapperBase) and collector._name.startswith("kvpool_"):
            out.append(Metric(_exposed_name(collector), collector._type, tuple(collector._labelnames),
                              collector._documentation, module_of.get(collector._name, "?")))  # fmt: skip
    return out


def vllm_labelnames() -> list[str]:
    """The labels vLLM's PrometheusStatLogger gives every connector series (a local variable there,
    so read from its source; the test fails here if vLLM changes how it names them)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    source = inspect.getsource(PrometheusStatLogger.__init__)
    match = re.search(r"labelnames\s*=\s*(\[[^\]]*\])", source)
    assert match, "vLLM's PrometheusStatLogger no longer sets `labelnames = [...]`: read how it labels now"
    return list(ast.literal_eval(match.group(1)))


def _connector_metrics(module: types.ModuleType) -> list[Metric]:
    from vllm.distributed.kv_transfer.kv_connector.v1 import metrics as vm

    out = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if not (issubclass(cls, vm.KVConnectorPromMetrics) and cls.__module__ == module.__name__):
            continue
        registry = CollectorRegistry(auto_describe=True)
        types_ = {
            vm.Gauge: functools.partial(vm.Gauge, registry=registry),
            vm.Counter: functools.partial(vm.Counter, registry=registry),
            vm.Histogram: functools.partial(vm.Histogram, registry=registry),
        }
        labels = vllm_labelnames()
        config = types.SimpleNamespace(kv_transfer_config=None)
        cls(config, types_, labels, {0: ["model", "0"]})
        out.extend(_from_registry(registry, {}))
    return [dataclasses.replace(m, module=module.__name__) for m in out]


@functools.cache
def exported() -> dict[str, Metric]:
    """Exposed name → Metric, for every metric kvpool defines."""
    if importlib.util.find_spec("vllm") is None:
        missing(
            "vLLM is not installed: the connector's metrics are built by a vLLM class (scripts/install.sh vllm)"
        )
    from prometheus_client import REGISTRY

    module_of: dict[str, str] = {}
    connector: list[Metric] = []
    for name in defining_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, prom.MetricWrapperBase):
                module_of.setdefault(value._name, name)
        connector.extend(_connector_metrics(module))
    metrics = [*_from_registry(REGISTRY, module_of), *connector]
    out: dict[str, Metric] = {}
    for m in metrics:
        assert m.name not in out, f"{m.name} is defined twice ({out[m.name].module}, {m.module})"
        out[m.name] = m
    return out


def series_index() -> dict[str, Metric]:
    """Every series name a query may use (histograms' ``_bucket``/``_sum``/``_count`` too) → Metric."""
    return {s: m for m in exported().values() for s in m.series()}
