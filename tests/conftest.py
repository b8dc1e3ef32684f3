"""Fast by default, everything with ``--full``.

``python -m pytest`` runs every module of the suite with one representative of each matrix (one family
of each rule shape, one SIGKILL moment, the real model, Ray, the Hub server) and answers in minutes.
``python -m pytest --full`` (or ``STREAMFOLD_FULL=1``) adds the tests marked ``full``: every family in
transformers, every architecture x mode x dtype case, the derive drift check, SIGKILL spreads, large
synthetic checkpoints. ``.ci/run`` runs both.
"""
from __future__ import annotations

import os



def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the exhaustive matrices (tests marked 'full'); CI runs them")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of an exhaustive matrix; runs only with --full")
    config.addinivalue_line("markers", "only_for(types, param='case'): generated only for these model types")


def full_run(config) -> bool:
    return bool(config.getoption("--full") or os.environ.get("STREAMFOLD_FULL"))


def _not_applicable(item) -> bool:
    """A ``only_for(types)`` test on a case outside ``types`` (e.g. the image-prompt check of a text-only
    family): not generated, rather than collected and skipped."""
    mark = item.get_closest_marker("only_for")
    spec = getattr(item, "callspec", None)
    if mark is None or spec is None:
        return False
    case = str(spec.params.get(mark.kwargs.get("param", "case"), ""))
    return case.partition("+")[0] not in mark.args[0]


def pytest_collection_modifyitems(config, items):
    full = full_run(config)
    keep, drop = [], []
    for item in items:
        (drop if _not_applicable(item) or (not full and item.get_closest_marker("full")) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    return ("streamfold: full suite (--full)" if full_run(config)
            else "streamfold: fast suite; `python -m pytest --full` adds the exhaustive matrices")
