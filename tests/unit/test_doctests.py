"""Every example in the docstrings of snapshotd and snapshotd_client runs (doctest): the
public APIs are documented with runnable examples, and this keeps them true."""

import doctest
import importlib
import pkgutil

import pytest

import snapshotd
import snapshotd_client

# Modules that start processes or need a cluster in their examples are shown, not run.
_SKIP = {"snapshotd.__main__"}
# Framework integrations: examined where their framework (an optional extra) is installed.
_OPTIONAL = {"snapshotd_client.hf": "transformers", "snapshotd_client.lightning": "lightning"}


def _modules():
    for pkg in (snapshotd, snapshotd_client):
        yield pkg.__name__
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name not in _SKIP:
                yield info.name


@pytest.mark.parametrize("name", sorted(set(_modules())))
def test_docstring_examples_run(name):
    if name in _OPTIONAL:
        pytest.importorskip(_OPTIONAL[name], reason=f"{name} needs {_OPTIONAL[name]} "
                            "(pip install -e './client[hf,lightning]')")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
