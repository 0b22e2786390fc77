"""The run as a pipeline of phases (docs/architecture.md, "one step").

Each phase is an object with its own state and a small uniform interface:

- `step(t, dt, ...)`: once per clock step, with the data it needs passed in, returning
  what the next phases need (readings, net import, bus voltages);
- `interval_end(i, t, ...)`: at the end of market interval `i` (books closed, payments,
  the market round, a block);
- what it contributes to the run's summary (`summary()`, or named figures).

`Run` passes results from one phase to the next, so no phase reads or writes another's
state. Phases that only compute (environment physics, feeder, accounting, settlement) are
pure and tested with numbers; those that do I/O (device I/O, market round, ledger) say so
in their docstrings.
"""
