"""Pure device physics: PV, battery (eqs. 1-6), meter, household load.

No I/O here: the emulators, the market (TCR curves, schedules) and the profiles all call
these functions, so a run replays exactly from its seed."""
