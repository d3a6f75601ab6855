"""The five stages of one SPPO iteration, one module each (generate → rank → targets → reflogps → train); each
is a :class:`~sppo_kernels.pipeline.core.stage.Stage` and imports no other stage."""
