"""IEEE 1547.1-2020 conformance tests through the driver, against any device that speaks
the SunSpec IEEE 1547 models (701-713): emulated (the test drives the terminal voltage and
frequency itself) or real (through a grid source: a programmable AC source, a HIL
simulator, or an operator following prompts)."""
