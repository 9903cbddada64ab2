"""Every replica's numbers in one place, and the drain signal: a registry actor per Serve application.

A Serve handle sends each call to one replica, so no call can ask every engine replica for its
numbers, and a scrape of `/metrics` reaches one gateway replica. Instead each engine and gateway
replica publishes its numbers every `PublishOptions.period_s` to `MetricsRegistry`, a named Ray actor
(no CPUs), and whichever gateway answers a scrape renders the registry's collection. Why this and not
the alternatives on Ray Serve 2.60:

- `ray.util.metrics` goes through Ray's per-node metrics agents, which a scrape of the gateway through
  the head's Serve proxy does not reach (Prometheus would have to scrape every pod's agent).
- Calling the replica actors directly needs Serve's private replica protocol.
- The registry is read from memory, so `/metrics` never waits behind generation requests queued at a
  saturated engine replica; the publishing replica reads its statistics between steps, off the
  request path.

The actor is not detached: it lives as long as the replica that created it. When that replica goes,
the next publish from any replica creates a new one and every replica fills it again within a period
(a scrape in between answers with the numbers it had). A replica that stops without saying so
(killed) is forgotten after `PublishOptions.forget_after_s`.

`grok-serve up` drains through the same actor (`drain_gateways`): the gateways learn it on their next
publish, refuse new requests with 503 from then on, and report how many streams they still serve.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray

logger = logging.getLogger(__name__)

# Serve runs its replicas in this Ray namespace; a driver (`grok-serve up`) names it to find the actor.
SERVE_NAMESPACE = "serve"


@dataclass(frozen=True)
class PublishOptions:
    period_s: float = 2.0  # how often each replica publishes: the staleness of a scrape
    forget_after_s: float = 60.0  # a replica silent this long is gone (killed without removing itself)

    def __post_init__(self) -> None:
        if not 0 < self.period_s < self.forget_after_s:
            raise ValueError(f"need 0 < period_s < forget_after_s, got {self.period_s}, {self.forget_after_s}")


DEFAULT_PUBLISH = PublishOptions()


@ray.remote(num_cpus=0)
class MetricsRegistry:
    """Latest numbers per source (`engine` replica or `gateway` replica), and whether to drain."""

    def __init__(self, forget_after_s: float):
        self._forget_after_s = forget_after_s
        self._entries: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._draining = False

    def publish(self, kind: str, source: str, numbers: dict[str, Any]) -> bool:
        """Store a source's numbers; answers whether the application is draining."""
        self._entries[(kind, source)] = (time.monotonic(), numbers)
        return self._draining

    def remove(self, kind: str, source: str) -> None:
        self._entries.pop((kind, source), None)

    def collect(self) -> dict[str, Any]:
        """{"engines": [snapshot + "age_s"], "gateways": [{"gateway", ..., "age_s"}]} of live sources."""
        now = time.monotonic()
        self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self._forget_after_s}
        out: dict[str, list] = {"engines": [], "gateways": []}
        for (kind, _), (at, numbers) in sorted(self._entries.items()):
            out[kind + "s"].append({**numbers, "age_s": now - at})
        return out

    def drain(self) -> None:
        self._draining = True


def registry(app_name: str, options: PublishOptions) -> Any:
    """The application's registry, created by the first caller (blocking: call it off the event loop)."""
    return MetricsRegistry.options(name=f"grok-serve-metrics:{app_name}", namespace=SERVE_NAMESPACE,
                                   get_if_exists=True).remote(options.forget_after_s)


class Publisher:
    """Publishes `read()` as `kind`/`source` every period from a replica's event loop, until `stop`.
    `on_drain` runs once, when the registry first says the application drains."""

    def __init__(self, app_name: str, kind: str, source: str, read: Callable[[], Awaitable[dict[str, Any]]],
                 options: PublishOptions = DEFAULT_PUBLISH, on_drain: Callable[[], None] | None = None):
        self.app_name, self.kind, self.source, self.options = app_name, kind, source, options
        self._read, self._on_drain = read, on_drain
        self._registry: Any = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"publish-{self.kind}")

    async def publish_once(self) -> None:
        numbers = await self._read()
        if self._registry is None:
            self._registry = await asyncio.to_thread(registry, self.app_name, self.options)
        try:
            draining = await self._registry.publish.remote(self.kind, self.source, numbers)
        except ray.exceptions.RayActorError:
            self._registry = None  # its owner went away: the next round makes a new one
            raise
        if draining and self._on_drain is not None:
            self._on_drain()
            self._on_drain = None
            # At once, so that a waiting drain sees the acknowledgement without another period.
            await self._registry.publish.remote(self.kind, self.source, await self._read())

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again; metrics never stop a replica
                logger.warning("publishing %s metrics failed", self.kind, exc_info=True)
            await asyncio.sleep(self.options.period_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._registry is not None:
            try:
                # Bounded: a replica stopping must not wait on a registry that is going away too.
                await asyncio.wait_for(self._registry.remove.remote(self.kind, self.source), self.options.period_s)
            except Exception:  # the registry went first; it forgets us by itself
                logger.debug("could not remove %s from the registry", self.source, exc_info=True)


def drain_gateways(app_name: str, timeout_s: float, poll_s: float = 0.5,
                   options: PublishOptions = DEFAULT_PUBLISH) -> int:
    """From a driver: tell the application's gateways to drain and wait until each has refused new
    requests and finished its streams, or `timeout_s`. Returns the streams still open at the end."""
    handle = registry(app_name, options)
    ray.get(handle.drain.remote())
    deadline = time.monotonic() + timeout_s
    while True:
        gateways = ray.get(handle.collect.remote())["gateways"]
        # A gateway that published before it heard of the drain may still take new requests.
        open_streams = sum(g.get("in_flight", 0) for g in gateways)
        if all(g.get("draining") for g in gateways) and open_streams == 0:
            return 0
        if time.monotonic() >= deadline:
            return open_streams
        time.sleep(poll_s)
