"""Reproductions of the paper's experiments ("Symmetry Leads to Structured Constraint of Learning").

Each module here is one experiment with a ``run(out_dir, *, quick=True, seed=0,
progress=True) -> dict`` entry point that trains, writes a figure and a JSON
record into ``out_dir`` and returns the same record (claim, metrics, criterion,
verdict, config, seconds). ``symfast demo`` runs :mod:`.fig1_left`.

This package depends on the library (``symfast.dcs``), never the other way
round: nothing under ``symfast/`` outside this package may import it.
"""
