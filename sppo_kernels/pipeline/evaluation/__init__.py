"""Evaluation: win rates of each iteration's policy against a baseline, judged pairwise, AlpacaEval 2.0-style
(``statistics``, the ``responses`` and ``verdicts`` stages, the ``report``, and ``evaluate`` that ties them)."""
