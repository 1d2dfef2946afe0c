"""Errors of the adapter layer. `phimm` turns them into `phimm.errors.AdapterError` at its boundary (adapters
does not import phimm: dependencies point one way)."""


class AdapterDataError(ValueError):
    """Adapter files or tensors that do not fit the base model, or cannot be read."""
