"""What the tests share: the gateway (in process or as a process), the database, the fake upstream, helpers.

Test modules import from here and never from each other or from conftest.py; conftest.py
only turns these into fixtures. `support.internals` is the one module that reads the
app's in-process state.
"""
