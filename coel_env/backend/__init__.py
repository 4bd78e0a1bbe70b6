"""What serves a plan: the batch-first contract and its N = 1 adapter (contract.py), the one metrics schema
(metrics.py), the surrogate (surrogate.py, its numba formulas and kernels in physics.py) and the name registry
(registry.py); the real backend (package real_backend) registers itself there."""
