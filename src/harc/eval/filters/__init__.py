"""Policy layers (input filters), one per module, registered by name."""

from harc.eval.filters.base import (
    BLOCKED,
    FILTERS,
    Filter,
    PolicyContext,
    get_filter,
    register_filter,
)

__all__ = ["BLOCKED", "FILTERS", "Filter", "PolicyContext", "get_filter", "register_filter"]
