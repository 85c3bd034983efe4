"""Support code shared by the tests (no tests here): waiting on state, processes, real kernels.

- :mod:`support.waiting`: ``wait_until(predicate, timeout, what)``, the one way a test waits;
- :mod:`support.processes`: what counts as a leaked process, fd or port; marker files ranks write;
- :mod:`support.kernels`: a real Jupyter kernel driven with jupyter_client.
"""
