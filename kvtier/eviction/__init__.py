"""Eviction and admission for one tier's entries.

:func:`make_policy` builds a policy by name (``lru``, ``lfu``, ``arc``,
``s3fifo``, ``adaptive`` = :data:`DEFAULT_POLICY`); all choose victims among
leaves only (see :mod:`kvtier.eviction.base`). :class:`BudgetIndex` is the
budgeted index a tier runs; :func:`make_admission` its admission filter.
"""

from kvtier.eviction import adaptive as _adaptive  # noqa: F401  (registers its policy)
from kvtier.eviction import policies as _policies  # noqa: F401  (registers lru, lfu, arc, s3fifo)
from kvtier.eviction.admission import ADMISSIONS, Admission, AlwaysAdmit, SecondSight, make_admission
from kvtier.eviction.base import EvictionPolicy, make_policy, policy_names, register
from kvtier.eviction.index import BudgetIndex

DEFAULT_POLICY = "adaptive"

__all__ = [
    "ADMISSIONS",
    "DEFAULT_POLICY",
    "Admission",
    "AlwaysAdmit",
    "BudgetIndex",
    "EvictionPolicy",
    "SecondSight",
    "make_admission",
    "make_policy",
    "policy_names",
    "register",
]
