"""dsdm: dataset distillation by Diversified Semantic Distribution Matching."""
import os

# OpenMP threads that spin while waiting make torch 10-20x slower whenever another
# process (a Ray actor, a second trial, a test) shares the cores; measured on 2 cores.
# Must be set before torch initialises OpenMP, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
