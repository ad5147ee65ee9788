"""Resolving the implementation under test, and asking it which path it ran.

The default candidate is ``fused_lstm.LSTM``, imported only when needed so this
package can be imported (and tested) before the extension is built.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Optional, Union

import torch

#: Anything called like ``torch.nn.LSTM(**kwargs)`` that returns an LSTM-like module.
CandidateFactory = Callable[..., torch.nn.Module]

#: Short names accepted by ``--candidate``.
ALIASES = {"fused": "fused_lstm:LSTM", "torch": "torch.nn:LSTM"}


def resolve_candidate(spec: Union[str, CandidateFactory, None] = None) -> CandidateFactory:
    """Turn ``spec`` into a module factory.

    ``None`` or ``"fused"`` means ``fused_lstm.LSTM``; ``"torch"`` means ``torch.nn.LSTM``
    (the baseline against itself, a smoke test of the harness); ``"pkg.mod:Attr"`` or
    ``"pkg.mod.Attr"`` imports an attribute; a callable is returned unchanged.
    Raises ``ImportError`` with an actionable message when the import fails.
    """
    if callable(spec):
        return spec
    target = ALIASES.get(spec or "fused", spec or "fused")
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"candidate {spec!r}: expected 'fused', 'torch' or 'package.module:Class'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        hint = " (is the extension built? try --candidate torch to test the harness)" if target == ALIASES["fused"] else ""
        raise ImportError(f"cannot load candidate {target}: {exc}{hint}") from exc
    if not callable(factory):
        raise ImportError(f"candidate {target} is not callable")
    return factory


def cell_factory(factory: CandidateFactory) -> CandidateFactory:
    """The ``LSTMCell`` that goes with an LSTM factory: the ``LSTMCell`` attribute of the module the factory
    is defined in (``fused_lstm.LSTMCell`` for ``fused_lstm.LSTM``, ``torch.nn.LSTMCell`` for
    ``torch.nn.LSTM``). Raises ``ImportError`` when there is none."""
    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    cell = getattr(module, "LSTMCell", None)
    if not callable(cell):
        raise ImportError(f"candidate {candidate_name(factory)} has no LSTMCell next to it to run cell shapes")
    return cell


def candidate_name(factory: CandidateFactory) -> str:
    """Dotted name of the factory, e.g. ``fused_lstm.modules.LSTM``."""
    module = getattr(factory, "__module__", None) or "?"
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    return f"{module}.{name}"


def last_path(model: torch.nn.Module) -> Optional[str]:
    """Which kernel path the candidate's last call took, if it says.

    Looks for a ``last_path`` attribute on the module, then a ``last_path()`` function
    (or attribute) on its top-level package; ``None`` when neither exists.
    """
    value: Any = getattr(model, "last_path", None)
    if value is None:
        package = sys.modules.get(type(model).__module__.split(".")[0])
        value = getattr(package, "last_path", None)
    if callable(value):
        try:
            value = value()
        except Exception:  # a diagnostic must never break a benchmark
            return None
    return None if value is None else str(value)
