"""fdpipe's benchmarks (bench/README.md). fdpipe is imported first so that its environment defaults
(OMP_WAIT_POLICY, THP_MEM_ALLOC_ENABLE) are in place before torch loads, as they are for the `fdpipe` command."""

import importlib

importlib.import_module("fdpipe")
