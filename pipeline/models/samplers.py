"""Few-step samplers for the SD 1.5 inpaint role: a distilled acceleration LoRA plus its scheduler.

``sampler`` in a diffusion settings section (``enhance``, ``displace.fill``, ``rotate.fill``) is one of:

- ``default``: the section's own steps and guidance with the pipeline's own scheduler (as before).
- ``lcm``: LCM-LoRA (``latent-consistency/lcm-lora-sdv1-5``, role ``lcm_lora``) with diffusers'
  ``LCMScheduler``; the model card runs 2-8 steps at guidance 0-2 (1 = no second UNet pass).
- ``tcd``: TCD-LoRA (``h1t/TCD-SD15-LoRA``, role ``tcd_lora``) with ``TCDScheduler``; the model
  card runs 4 steps at guidance 0 with ``eta`` (gamma) 0.3, higher eta for more steps.
- ``hyper``: Hyper-SD (``ByteDance/Hyper-SD``, ``Hyper-SD15-8steps-lora.safetensors``, role
  ``hyper_lora``) with ``DDIMScheduler(timestep_spacing="trailing")`` as its model card says, 8
  steps at guidance 0.

Each few-step sampler's steps, guidance, eta and LoRA weight come from the ``samplers`` settings
section (:class:`pipeline.settings.SamplersSettings`), so a shop tunes them once for every edit.

:func:`sampling` switches one pipeline to a sampler for one call: the acceleration LoRA is made
active next to the call's style LoRAs (each at its own adapter weight, through the registry's
:class:`pipeline.models.lora_weights.LoraAdapters`) and the pipeline's scheduler is swapped; both are
undone on exit. The caller holds ``registry.lock("inpaint")`` around it, as around every use of
the shared UNet, so no other edit ever runs with another edit's sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from pipeline.models.lora_weights import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.lora_weights import LoraSpec
    from pipeline.models.registry import ModelRegistry

__all__ = ["ACCEL_ROLES", "SAMPLERS", "SamplerPlan", "plan_sampler", "sampling"]

SAMPLERS: tuple[str, ...] = ("default", "lcm", "tcd", "hyper")
# sampler -> its acceleration LoRA's model role
ACCEL_ROLES: dict[str, str] = {"lcm": "lcm_lora", "tcd": "tcd_lora", "hyper": "hyper_lora"}
# sampler -> (diffusers scheduler class, from_config overrides), from each LoRA's model card
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "hyper": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}


@dataclass(frozen=True)
class SamplerPlan:
    """What one generation runs with: ``steps`` and ``guidance`` passed to the pipeline, ``eta``
    (None: not passed), the scheduler class name (None: the pipeline's own) and its overrides, the
    acceleration LoRA's role and adapter weight (None for ``default``)."""

    name: str
    steps: int
    guidance: float
    eta: float | None = None
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    role: str | None = None
    lora_weight: float = 1.0

    def to_record(self) -> dict[str, Any]:
        return {"sampler": self.name, "steps": self.steps, "guidance": self.guidance, "eta": self.eta,
                "scheduler_override": self.scheduler, "scheduler_kwargs": dict(self.scheduler_kwargs),
                "acceleration_role": self.role, "acceleration_weight": self.lora_weight if self.role else None}


def plan_sampler(name: str, steps: int, guidance: float, samplers: Any) -> SamplerPlan:
    """The plan for sampler ``name``: ``default`` keeps ``steps`` and ``guidance`` (the section's);
    a few-step sampler takes its own from ``samplers`` (the ``samplers`` settings section).
    Raises ValueError for an unknown name."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (one of: {', '.join(SAMPLERS)})")
    if name == "default":
        return SamplerPlan("default", int(steps), float(guidance))
    s = getattr(samplers, name)
    cls, kw = _SCHEDULERS[name]
    return SamplerPlan(name, int(s.steps), float(s.guidance), eta=s.eta, scheduler=cls, scheduler_kwargs=dict(kw),
                       role=ACCEL_ROLES[name], lora_weight=float(s.lora_weight))


@contextlib.contextmanager
def sampling(registry: "ModelRegistry", pipe: Any, plan: SamplerPlan,
             loras: Sequence["LoraSpec"] = ()) -> Iterator[dict[str, Any]]:
    """Run the body with ``pipe`` switched to ``plan``: adapters ``[acceleration LoRA, *loras]``
    active at their weights (only ``loras`` for ``default``; none at all: every LoRA layer off) and
    the plan's scheduler in place. Yields the record: ``loras`` (style LoRA records), ``acceleration``
    (its LoRA record and the role's provenance, or None), ``scheduler`` (class name used) and the
    plan. Everything is undone on exit, also on error. Hold ``registry.lock("inpaint")``."""
    import diffusers

    adapters = registry.adapters("inpaint")
    accel = None
    specs = list(loras)
    if plan.role is not None:
        base = registry.get(plan.role)
        accel = dataclasses.replace(base, weight=plan.lora_weight)
        if any(s.sha256 == accel.sha256 for s in specs):
            raise LoraError(f"LoRA {accel.path} is the {plan.name} acceleration LoRA ({plan.role}); do not list it "
                            "as a style LoRA too")
        specs = [accel, *specs]
    records = adapters.activate(specs)
    old = pipe.scheduler
    try:
        if plan.scheduler is not None:
            cls = getattr(diffusers, plan.scheduler)
            pipe.scheduler = cls.from_config(old.config, **plan.scheduler_kwargs)
        rec: dict[str, Any] = {
            **plan.to_record(), "scheduler": type(pipe.scheduler).__name__,
            "loras": records[1:] if accel is not None else records,
            "acceleration": None if accel is None else {**records[0], "role": plan.role,
                                                        "provenance": registry.provenance(plan.role)},
            "active_adapters": list(pipe.get_active_adapters()) if specs else [],
        }
        yield rec
    finally:
        pipe.scheduler = old
        adapters.deactivate()
