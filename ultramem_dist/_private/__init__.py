"""Internals of ultramem-dist; not a public API."""
