"""``sppo-train demo``: a CPU-size replica of the SPPO paper's experiment (``replica``), its hidden gold judge and
synthetic prompt world (``gold``), tiny offline models (``tiny_models``, also used by the tests and examples) and
the console filter that keeps third-party noise off the screen (``console``)."""
