"""ultramem-dist."""
