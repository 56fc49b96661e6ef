"""Suite-wide settings."""

import os

# Two cores are shared by the test process and, in integration tests, Ray workers: one torch
# thread per process avoids oversubscription (measured: unit tests 3x slower without it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
