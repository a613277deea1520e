"""Capacity planning: how many machines a workload needs, within its latency SLOs.

Pure (no grpc, ray or redis): the edge (router_service.loadtest) measures, this package models.

  workload.py   token-length distributions, arrival processes, JSONL traces
  metrics.py    request-level metrics (TTFT, TPOT, ITL, throughput, goodput), shared with the load test
  simulate.py   discrete-event simulation of continuous batching and queueing
  hardware.py   published device and model figures (MODELS.md)
  perfmodel.py  step-time models: fitted from measurements, or a roofline from published figures
  profile.py    load-test reports -> a fitted, calibrated step-time model
  search.py     deployment search (gateways x expert workers x redundant experts)
  planner.py    `mesh plan` as a function

See docs/capacity-planning.md.
"""
