"""Load tests against a running `mesh serve` (`mesh loadtest`) and the capacity planner's CLI
(`mesh plan`; the planner itself is the pure mesh.plan).

  generator.py  open/closed-loop Generate streams over grpc.aio, per-request records, self-watch
  runner.py     every load level against one target, then the report files
  report.py     figures per level, the planner's profile, report.json / requests.jsonl
  plots.py      PNG plots and a self-contained HTML page
  nulltarget.py a trivially fast Inference server: how fast can the generator go?
  cli.py        `register(subparsers)` adds `loadtest` and `plan` to the `mesh` CLI
"""
