"""The `fdpipe` command line: extract, distill, finetune, analyze, demo and store tools.

Imports of heavy modules happen inside commands so that `fdpipe --help` is instant. Every user-fixable failure is an
FdpipeError and becomes one line on stderr with exit code 1; click's usage errors exit 2.
"""

from __future__ import annotations

import click

from .analyze.cli import analyze
from .demo import demo
from .distill.cli import distill
from .extract.cli import extract
from .finetune.cli import finetune
from .options import CONTEXT, Group
from .store.cli import store


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="fdpipe")
def main() -> None:
    """Feature distillation at scale: run the teacher once, store its whitened features, train many students.

    \b
    fdpipe extract   run a teacher over V augmented views per image and write a feature store
    fdpipe distill   train a student against a store (or a live teacher) by replaying the views
    fdpipe finetune  fine-tune a distilled student (CE, Core-tuning or DeiT-style distillation)
    fdpipe analyze   attention diagnostics of students and teachers
    fdpipe demo      the whole pipeline on Fashion-MNIST with a real pretrained teacher
    fdpipe store     inspect, verify, convert and merge stores
    """
    _warnings_as_lines()


def _warnings_as_lines() -> None:
    """An FdpipeWarning prints as one line, `warning: ...` (Python's own format adds the file and source line)."""
    import sys
    import warnings

    from .errors import FdpipeWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        if issubclass(category, FdpipeWarning):
            print(f"warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    if getattr(shown, "__name__", "") != "show":
        warnings.showwarning = show


# each command lives beside the code it drives (one package per stage)
for _command in (extract, distill, finetune, analyze, demo, store):
    main.add_command(_command)


def entry() -> None:
    """Console entry point: run the click group, flush, and leave without C++ static destructors.

    With torch and pyarrow loaded, interpreter teardown intermittently aborts ("terminate called without an active
    exception") after a command has finished and printed its result; os._exit keeps the command's own exit code.
    """
    import os
    import sys

    from .memory import reuse_freed_memory

    reuse_freed_memory()
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
