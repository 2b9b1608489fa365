"""The ``lorax-merge`` command: merge PEFT LoRA adapter folders into a new adapter folder.

Usage::

    lorax-merge ADAPTER_DIR [ADAPTER_DIR ...] --output DIR --strategy STRATEGY [options]

Every bad input (a missing or malformed file, differing ranks, a bad parameter, ...) is reported as
one line on stderr with exit code 2.  The output folder appears atomically: it is written as a
hidden temporary folder beside the output and renamed into place once complete, so an interrupted or
failed run leaves no partial adapter behind.  See ``docs/cli.md``.

Modules: ``command`` (arguments, the run's steps, ``main``), ``inputs`` (reading adapter folders),
``configs`` (checking configurations against each other and their tensors), ``merging`` (the
merge and its non-finite checks), ``output`` (the output folder and its atomic write),
``report`` (provenance, summary, progress).
"""

from .command import main

__all__ = ["main"]
