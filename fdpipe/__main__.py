"""`python -m fdpipe ARGS`: the console entry point (`fdpipe ARGS`) for a process Python starts (the demo's stages)."""

from .cli import entry

if __name__ == "__main__":
    entry()
