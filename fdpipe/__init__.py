"""fdpipe: feature distillation with a cached, shareable teacher-feature store."""

import os

# DataLoader workers share the cores with the main process. Spinning OpenMP threads then wait for descheduled peers:
# on 2 cores a student step measured 10-30x slower than with sleeping waits, which cost little when a core is free.
# Set before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
