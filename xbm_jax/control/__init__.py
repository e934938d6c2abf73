"""Host-side training policy for the memory: when it is on, and when it is cut.

`controller` (the drift-based start rule: turn the memory on once features move slowly),
`paired_guard` (cut the memory when a paired test on validation hits says it hurts).
They read metrics between steps and set traced gates; nothing here runs on device.
"""
