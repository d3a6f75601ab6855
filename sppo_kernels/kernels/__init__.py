"""Triton kernels, one per file. Importing this package imports triton; whether the kernels are interpreted is
decided when they are decorated, i.e. by ``TRITON_INTERPRET`` at import time."""
