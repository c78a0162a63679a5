"""``python -m ultramem_dist.cli``: the ``ultramem-dist`` command."""

from ultramem_dist.cli import main

main()
