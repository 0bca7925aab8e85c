"""Benchmarks recorded in docs/benchmarks.md (``make bench`` = ``python -m benchmarks.run``).

Each section is a module with a function ``run(args, workdir) -> dict`` that
prints its own markdown tables and returns its numbers (JSON-ready). To add a
section, write the module and add one line to :data:`benchmarks.run.SECTIONS`.
Keep heavy imports (torch) inside the section's functions, so that
``--only offline`` and ``--help`` stay fast.
"""
