"""The DSO's limits for the feasibility check (pydantic: they live in the site file)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pu = Annotated[float, Field(gt=0.5, lt=1.5)]
Pct = Annotated[float, Field(gt=0, le=1000)]


class GridLimits(BaseModel):
    """Voltage band and loading limits.

    Hard band 0.90-1.10 p.u. (EN 50160's +-10 %); a tighter planning band (default
    0.95-1.05) and a planning loading (default 80 %) turn the traffic light amber.
    `enforce` says which of the two the re-clear loop restores: `hard` (default: the
    market runs until a real limit is at stake) or `planning` (a cautious DSO).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vm_min_pu: Pu = 0.90
    vm_max_pu: Pu = 1.10
    plan_vm_min_pu: Pu = 0.95
    plan_vm_max_pu: Pu = 1.05
    line_max_pct: Pct = 100.0
    trafo_max_pct: Pct = 100.0
    plan_loading_pct: Pct = 80.0
    enforce: Literal["hard", "planning"] = "hard"

    @model_validator(mode="after")
    def _sense(self) -> GridLimits:
        if self.vm_min_pu >= self.vm_max_pu:
            raise ValueError(f"vm_min_pu ({self.vm_min_pu}) must be below vm_max_pu "
                             f"({self.vm_max_pu})")
        if self.plan_vm_min_pu >= self.plan_vm_max_pu:
            raise ValueError(f"plan_vm_min_pu ({self.plan_vm_min_pu}) must be below "
                             f"plan_vm_max_pu ({self.plan_vm_max_pu})")
        if not self.vm_min_pu <= self.plan_vm_min_pu < self.plan_vm_max_pu <= self.vm_max_pu:
            raise ValueError(f"the planning band {self.plan_vm_min_pu}-{self.plan_vm_max_pu} "
                             f"must lie inside the hard band {self.vm_min_pu}-{self.vm_max_pu}")
        if self.plan_loading_pct > min(self.line_max_pct, self.trafo_max_pct):
            raise ValueError(f"plan_loading_pct ({self.plan_loading_pct}) must not exceed "
                             f"line_max_pct/trafo_max_pct ({self.line_max_pct}/"
                             f"{self.trafo_max_pct})")
        return self
