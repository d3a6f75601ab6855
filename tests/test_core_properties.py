"""Property-based: random shapes and options, every backend against the float64 reference."""

from __future__ import annotations

import torch
from core_cases import make_case, rel_err, runnable_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_backends import backend_grads, reference_grads


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(runnable_backends()),
    batch=st.integers(1, 4),
    length=st.integers(2, 19),
    width=st.integers(1, 45),
    vocab=st.integers(2, 140),
    softcap=st.one_of(st.none(), st.floats(0.5, 50.0)),
    temperature=st.floats(0.3, 2.5),
    shift=st.booleans(),
    bias=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_reference(backend, **kw):
    case = make_case(fully_masked=kw["batch"] > 2, **kw)
    ref_out, ref_logps, ref_params = reference_grads(case)
    out, logps, params = backend_grads(case, backend, torch.float32)
    assert abs(out.item() - ref_out.item()) <= 1e-4 * max(1.0, abs(ref_out.item()))
    assert (logps.double().cpu() - ref_logps).abs().max() <= 1e-4 * max(1.0, ref_logps.abs().max().item())
    for name, p in params.items():
        if p is not None and ref_params[name].grad.abs().max() > 0:
            assert rel_err(p.grad, ref_params[name].grad) <= 2e-4, name
