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


def full_run(config) -> bool:
    return bool(config.getoption("--full") or os.environ.get("STREAMFOLD_FULL"))


def pytest_collection_modifyitems(config, items):
    if full_run(config):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("full") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    return ("streamfold: full suite (--full)" if full_run(config)
            else "streamfold: fast suite; `python -m pytest --full` adds the exhaustive matrices")
