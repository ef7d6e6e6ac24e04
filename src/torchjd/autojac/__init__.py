"""Jacobians of several objectives stored in ``.jac`` fields, and their aggregation into ``.grad``."""

__all__: list[str] = []
