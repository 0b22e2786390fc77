"""Co-simulation over HELICS: emulator shards and the run as federates.

HELICS (PNNL/NREL/LLNL) brokers and time management keep the federates in step; this
package only maps the testbed's data flow onto HELICS publications, subscriptions and
granted times (`names` is the naming scheme, `timing` the sub-step schedule)."""
