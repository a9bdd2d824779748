"""Examples of clients at the end of a TokenFlow stream (run from the repository root: ``python -m examples.voice``)."""
