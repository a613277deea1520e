"""Capacity planning: how many machines a workload needs, within its latency SLOs.

Pure (no grpc, ray or redis): the edge (router_service.loadtest) measures, this package models.

  workload.py   token-length distributions, arrival processes, JSONL traces
  metrics.py    request-level metrics (TTFT, TPOT, ITL, throughput, goodput), shared with the load test
  simulate.py   discrete-event simulation of continuous batching and queueing
  hardware.py   published device figures and model shapes (docs/reference-figures.md)
  perfmodel.py  deployments, expert-load imbalance, the roofline from published figures
  fit.py        non-negative linear fits with their standard errors and data ranges
  measured.py   the measured model: per-shape parts (host, dense, experts, transport) and how they
                carry over to shapes that were not profiled
  profile.py    profiles (`mesh loadtest` reports, `mesh profile` files) -> a fitted measured model
  gpu.py        bench/gpu_serving.py output -> the roofline with measured constants
  search.py     deployment search (gateways x expert workers x redundant experts)
  planner.py    `mesh plan` as a function

See docs/capacity-planning.md.
"""
