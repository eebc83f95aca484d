"""A job's route: the ordered hops it runs through, fixed at submit from its model and kept in its record.

``encode -> transform -> decode`` is the route of a Wan2.1 job. A transform hop may cover only a range of
the denoising steps: with ``transform.split_at_step: K`` a job of n > K steps runs
``encode -> transform@high [0, K) -> transform@low [K, n) -> decode``, the first transform hop handing the
latents *and* the scheduler's multistep state to the second (the mechanism Wan2.2's two experts use).

A Wan2.2-A14B model's two experts make the same shape of route with the experts placed apart
(``model_options.MODEL.experts: split``, the default): ``transform@high`` runs the high-noise expert's steps
and ``transform@low`` the low-noise expert's. Their step ranges come from the model's ``boundary_ratio`` and
the scheduler's timesteps, which only a worker holding diffusers computes, so such a hop names its
``expert`` instead of fixed steps; each worker finds the same boundary from the same model dir.

Everything that asks "what comes next / what came before" -- the finish transaction, lineage recovery,
retries, cancel, status and reports -- asks the job's ``Route``, never a stage. A record written before
routes existed has no ``route`` field and reads as the three-hop route.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.core.keys import Hop, Stage

ROUTE_FIELD = "route"


# A Wan2.2 expert: "high" runs the timesteps at or above the model's boundary, "low" the rest.
EXPERTS = ("high", "low")


@dataclass(frozen=True)
class RouteHop:
    """One hop of a route and, for a transform hop that covers only part of the loop, its steps ``[k0, k1)``
    or the Wan2.2 ``expert`` whose timesteps it runs."""

    hop: Hop
    steps: tuple[int, int] | None = None
    expert: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"hop": self.hop.value}
        if self.steps is not None:
            entry["steps"] = list(self.steps)
        if self.expert is not None:
            entry["expert"] = self.expert
        return entry

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.hop.value} [{self.steps[0]},{self.steps[1]})"
        if self.expert is not None:
            return f"{self.hop.value} ({self.expert}-noise expert)"
        return self.hop.value


@dataclass(frozen=True)
class Route:
    hops: tuple[RouteHop, ...]

    @property
    def names(self) -> tuple[Hop, ...]:
        return tuple(entry.hop for entry in self.hops)

    def _index(self, hop: Hop) -> int:
        names = self.names
        if hop not in names:
            raise ValueError(f"hop {hop.value} is not on this job's route ({' -> '.join(names)})")
        return names.index(hop)

    def __contains__(self, hop: object) -> bool:
        return hop in self.names

    @property
    def first(self) -> Hop:
        return self.hops[0].hop

    @property
    def last(self) -> Hop:
        return self.hops[-1].hop

    def next(self, hop: Hop) -> Hop | None:
        i = self._index(hop)
        return self.hops[i + 1].hop if i + 1 < len(self.hops) else None

    def previous(self, hop: Hop) -> Hop | None:
        i = self._index(hop)
        return self.hops[i - 1].hop if i > 0 else None

    def steps_of(self, hop: Hop) -> tuple[int, int] | None:
        """The denoising steps ``[k0, k1)`` ``hop`` covers, or None for a hop that runs them all (or none)."""
        return self.hops[self._index(hop)].steps

    def expert_of(self, hop: Hop) -> str | None:
        """The Wan2.2 expert ``hop`` runs (``high``/``low``), or None for a hop that is not one expert's part."""
        return self.hops[self._index(hop)].expert

    def of_kind(self, kind: Stage) -> tuple[Hop, ...]:
        return tuple(hop for hop in self.names if hop.kind is kind)

    def to_json(self) -> str:
        return json.dumps([entry.to_dict() for entry in self.hops], separators=(",", ":"))

    def describe(self) -> str:
        """``encode -> transform@high [0,3) -> transform@low [3,6) -> decode`` (logs, ``reelfarm status``)."""
        return " -> ".join(e.describe() for e in self.hops)


THREE_HOPS = Route((RouteHop(Stage.ENCODE), RouteHop(Stage.TRANSFORM), RouteHop(Stage.DECODE)))


class RouteUnreadable(ValueError):
    """A ``route`` field this farm cannot follow (planted by hand, or written by a newer version)."""


def parse_route(raw: str) -> Route:
    """The route a record's ``route`` field holds; refuses anything that is not a well-formed route."""
    try:
        entries = json.loads(raw)
        if not isinstance(entries, list) or not entries:
            raise ValueError("not a list of hops")
        hops = []
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) - {"hop", "steps", "expert"}:
                raise ValueError(f"hop entry {str(entry)[:80]!r}")
            steps = entry.get("steps")
            if steps is not None:
                if not (
                    isinstance(steps, list)
                    and len(steps) == 2
                    and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
                    and 0 <= steps[0] < steps[1]
                ):
                    raise ValueError(f"steps {str(steps)[:40]!r}")
                steps = (steps[0], steps[1])
            expert = entry.get("expert")
            if expert is not None and (expert not in EXPERTS or steps is not None):
                raise ValueError(f"expert {str(expert)[:20]!r} (one of {', '.join(EXPERTS)}, never with steps)")
            hops.append(RouteHop(Hop(str(entry["hop"])), steps, expert))
    except (ValueError, KeyError, TypeError) as exc:
        raise RouteUnreadable(f"unreadable route {raw[:120]!r}: {exc}") from None
    route = Route(tuple(hops))
    _check(route)
    return route


def _check(route: Route) -> None:
    names = route.names
    if len(set(names)) != len(names):
        raise RouteUnreadable(f"route {route.describe()} visits a hop twice")
    if names[0].kind is not Stage.ENCODE or names[-1].kind is not Stage.DECODE:
        raise RouteUnreadable(f"route {route.describe()} must start with encode and end with decode")
    ranges = [e.steps for e in route.hops if e.steps is not None]
    for before, after in zip(ranges, ranges[1:], strict=False):
        if before[1] != after[0]:
            raise RouteUnreadable(f"route {route.describe()} leaves a gap between its step ranges")


def route_of(fields: Mapping[str, Any]) -> Route:
    """The route of a job record already read; a record without one (written before routes) has three hops."""
    raw = fields.get(ROUTE_FIELD)
    return THREE_HOPS if not raw else parse_route(str(raw))


EXPERT_HOPS = Route(
    (
        RouteHop(Stage.ENCODE),
        RouteHop(Hop("transform@high"), expert="high"),
        RouteHop(Hop("transform@low"), expert="low"),
        RouteHop(Stage.DECODE),
    )
)


def route_for(
    steps: int, split_at_step: int | None, *, step_cached: bool = False, experts_split: bool = False
) -> Route:
    """The route a new job of ``steps`` denoising steps takes under the farm's ``transform.split_at_step``,
    or, for a two-expert model with its experts placed apart (``experts_split``), one hop per expert.

    Split only where both parts have steps: a job with ``K >= steps`` runs unsplit. A step-cached job runs
    unsplit too: its cache's state lives inside the DiT and cannot be handed on. Two experts are two DiTs
    with a cache each (as in diffusers' pipelines), so their split stands for a step-cached job too.
    """
    if experts_split:
        return EXPERT_HOPS
    if split_at_step is None or step_cached or not 0 < split_at_step < steps:
        return THREE_HOPS
    return Route(
        (
            RouteHop(Stage.ENCODE),
            RouteHop(Hop("transform@high"), (0, split_at_step)),
            RouteHop(Hop("transform@low"), (split_at_step, steps)),
            RouteHop(Stage.DECODE),
        )
    )
