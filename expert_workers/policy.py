"""The expert pool's policy loop: in the gateway, it watches the per-expert load over a sliding window,
rebalances when the load stays unbalanced, and sizes the pool from the tokens each worker serves.

Sizing (settings named as Ray Serve's autoscaling config): the routed tokens per second over the last
`look_back_period_s`, divided by `target_tokens_per_worker`, rounded up and kept within
[`min_workers`, `max_workers`], is the wanted worker count. When it stays above the current count for
`upscale_delay_s` the pool grows (`ExpertPool.scale`, whose new workers ask Ray for a placement group:
on KubeRay the autoscaler adds pods for it); when it stays below for `downscale_delay_s` it shrinks.
`max_workers` 0 turns sizing off.

Pressure signals, each off until set: requests waiting per worker above `max_queue_per_worker`, and
the p90 TTFT or TPOT over `look_back_period_s` above `ttft_slo_s` / `tpot_slo_s`. Any of them wants one
worker more than the pool has (within `max_workers`) and holds off shrinking; the gateway supplies the
figures (`signals`). A bigger pool spreads the expert compute; it does not shorten the gateway's own
attention and dense layers, which is why the signals ask for one worker at a time.

Every `interval_s` it samples the dispatcher's load counters (the window's points) and computes the
imbalance of the current placement over the last `look_back_period_s` seconds: max / mean rows per
worker, worst MoE layer. When that stays above `imbalance_threshold` for a whole look-back period (and
the window holds at least `min_rows` rows, so an idle pool is left alone), it calls
`ExpertPool.rebalance`. Every decision to act is logged with its reason, counted in the
`mesh.pool.decisions` metric and traced as a `mesh.pool.change` span; the imbalance is a gauge.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass

log = logging.getLogger("mesh.pool.policy")


@dataclass
class PolicyConfig:
    enabled: bool = False
    imbalance_threshold: float = 1.3
    look_back_period_s: float = 30.0
    interval_s: float = 1.0
    min_rows: int = 64
    min_workers: int = 1
    max_workers: int = 0  # 0: no sizing, only rebalancing
    target_tokens_per_worker: float = 100.0  # routed tokens per second per worker
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # pressure signals (0: not watched): requests waiting for a batch slot per worker, and the p90
    # TTFT / TPOT over the look-back period against these SLOs (seconds). Any of them above its
    # bound wants one worker more than the current count (within max_workers), and blocks shrinking.
    max_queue_per_worker: float = 0.0
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0

    def validate(self) -> None:
        if self.max_workers and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}")
        if self.target_tokens_per_worker <= 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError(f"target_tokens_per_worker must be > 0 and the delays >= 0, got "
                             f"{self.target_tokens_per_worker}, {self.upscale_delay_s}, {self.downscale_delay_s}")
        if self.imbalance_threshold < 1.0:
            raise ValueError(f"imbalance_threshold must be >= 1.0 (1.0 is perfect balance), got "
                             f"{self.imbalance_threshold}")
        if self.max_queue_per_worker < 0 or self.ttft_slo_s < 0 or self.tpot_slo_s < 0:
            raise ValueError(f"max_queue_per_worker, ttft_slo_s and tpot_slo_s must be >= 0 (0: not watched), got "
                             f"{self.max_queue_per_worker}, {self.ttft_slo_s}, {self.tpot_slo_s}")
        if self.look_back_period_s <= 0 or self.interval_s <= 0:
            raise ValueError(f"look_back_period_s and interval_s must be > 0, got {self.look_back_period_s}, "
                             f"{self.interval_s}")


class RebalancePolicy:
    def __init__(self, pool, config: PolicyConfig | None = None):
        self.pool = pool
        self.config = config or PolicyConfig()
        self.decisions: list[dict] = []  # what it did, newest last
        self.last_imbalance = 1.0
        self._above_since: float | None = None
        self._want_since: tuple[int, float] | None = None  # (wanted worker count, since when)
        self.last_tokens_per_s = 0.0
        # the gateway's own signals, set by the server: f(look_back_s) -> {"waiting": requests queued,
        # "ttft_p90_s", "tpot_p90_s": over the last look_back_s} (None: tokens and imbalance only)
        self.signals = None
        self.last_signals: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._metrics()

    def _metrics(self) -> None:
        from opentelemetry.metrics import Observation

        from mesh import telemetry
        m = telemetry.meter()
        self._counter = m.create_counter(telemetry.M_POOL_DECISIONS, unit="{decision}",
                                         description="expert pool placement decisions, by action and reason")
        m.create_observable_gauge(telemetry.M_POOL_IMBALANCE, [lambda _: [Observation(self.last_imbalance)]],
                                  description="max / mean rows per expert worker over the load window")

    def configure(self, config: PolicyConfig) -> PolicyConfig:
        config.validate()
        with self._lock:
            self.config = config
            self.pool.load_window_s = config.look_back_period_s
            self._above_since = None
            if config.enabled and (self._thread is None or not self._thread.is_alive()):
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="mesh-pool-policy", daemon=True)
                self._thread.start()
            elif not config.enabled and self._thread is not None:
                self._stop.set()
        return self.config

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failed change is logged; the loop keeps watching
                log.exception("expert pool policy: the check failed")

    def wanted_workers(self, tokens_per_s: float) -> int:
        c = self.config
        return max(c.min_workers, min(c.max_workers, math.ceil(tokens_per_s / c.target_tokens_per_worker)))

    def tick(self, now: float | None = None) -> dict | None:
        """One check; returns the change record when it changed the pool."""
        cfg = self.config
        now = time.monotonic() if now is None else now
        load = self.pool.window_load()
        rows = int(load.sum())
        if cfg.max_workers:
            tokens_per_s = self.pool.window_tokens_per_s(load)
            self.last_tokens_per_s = tokens_per_s
            want, have = self.wanted_workers(tokens_per_s), self.pool.num_workers
            pressure = self.pressure(have)
            if pressure:  # a queue or a missed SLO: one more worker, and never fewer
                want = max(want, min(cfg.max_workers, have + 1), have)
            if want == have:
                self._want_since = None
            else:
                if self._want_since is None or self._want_since[0] != want:
                    self._want_since = (want, now)
                delay = cfg.upscale_delay_s if want > have else cfg.downscale_delay_s
                if now - self._want_since[1] >= delay:
                    self._want_since = None
                    reason = (f"{'upscale' if want > have else 'downscale'}: {tokens_per_s:.0f} tokens/s over "
                              f"{have} workers, target {cfg.target_tokens_per_worker:g} per worker"
                              f"{'; ' + '; '.join(pressure) if pressure else ''} -> {want} workers "
                              f"(held {delay:g}s)")
                    return self.act("scale", reason, workers=want)
        imb = self.pool.imbalance(load)
        self.last_imbalance = imb
        if imb <= cfg.imbalance_threshold or rows < cfg.min_rows:
            self._above_since = None
            return None
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since < cfg.look_back_period_s:
            return None
        reason = (f"imbalance {imb:.2f} above {cfg.imbalance_threshold:.2f} for "
                  f"{now - self._above_since:.1f}s over {rows} rows")
        return self.act("rebalance", reason)

    def pressure(self, workers: int) -> list[str]:
        """The watched signals over their bounds, each as a few words (empty: none)."""
        cfg = self.config
        if self.signals is None or not (cfg.max_queue_per_worker or cfg.ttft_slo_s or cfg.tpot_slo_s):
            return []
        sig = self.signals(cfg.look_back_period_s)
        self.last_signals = sig
        out = []
        if cfg.max_queue_per_worker and sig.get("waiting", 0) > cfg.max_queue_per_worker * workers:
            out.append(f"{sig['waiting']} requests waiting, above {cfg.max_queue_per_worker:g} per worker")
        for name, slo in (("ttft", cfg.ttft_slo_s), ("tpot", cfg.tpot_slo_s)):
            got = sig.get(f"{name}_p90_s", 0.0)
            if slo and got > slo:
                out.append(f"{name.upper()} p90 {got * 1e3:.0f} ms above the {slo * 1e3:.0f} ms SLO")
        return out

    def act(self, action: str, reason: str, **kw) -> dict:
        """Carry out one decision, logged, counted and traced with its reason."""
        from mesh import telemetry
        log.info("expert pool policy: %s: %s", action, reason)
        with telemetry.tracer().start_as_current_span(telemetry.SPAN_POOL_CHANGE, attributes={
                "mesh.pool.action": action, "mesh.pool.reason": reason}) as span:
            record = self.pool.scale(kw["workers"]) if action == "scale" else self.pool.rebalance(**kw)
            span.set_attribute("mesh.pool.changed", bool(record["changed"]))
            span.set_attribute("mesh.pool.decision_to_serving_s", float(record["decision_to_serving_s"]))
        self._counter.add(1, {"action": action, "reason": reason.split(" ", 1)[0].rstrip(":")})
        self._above_since = None
        decision = {"action": action, "reason": reason, **record}
        self.decisions.append(decision)
        return decision

    def describe(self) -> dict:
        return asdict(self.config)

    def describe_proto(self) -> dict:
        """The fields of mesh.v1.AutoscalingConfig."""
        c = self.config
        return {"enabled": c.enabled, "imbalance_threshold": c.imbalance_threshold,
                "look_back_period_s": c.look_back_period_s, "interval_s": c.interval_s,
                "min_workers": c.min_workers, "max_workers": c.max_workers,
                "target_tokens_per_worker": c.target_tokens_per_worker, "upscale_delay_s": c.upscale_delay_s,
                "downscale_delay_s": c.downscale_delay_s, "max_queue_per_worker": c.max_queue_per_worker,
                "ttft_slo_s": c.ttft_slo_s, "tpot_slo_s": c.tpot_slo_s}
