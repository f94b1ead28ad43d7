"""Benchmarks that print ratios against a reference measured in the same run, never timed tests.

`receive` (receive.py): the SCP and spool against DCMTK's storescp. `infer` (infer.py): each
prompting method against the bare backbone on the same device.
"""


class BenchError(RuntimeError):
    """A benchmark cannot run here (a tool is missing, a peer failed); says which."""
