"""The rig service: closed-loop sessions a lab drives a living neuron with, over HTTP or a folder.

Layers: `journal` (typed events in SQLite), `replay` (state as a fold of events), `session` (ask/tell
logic, no I/O), `factory` (requests resolved as the maximize stage resolves runs), `mirror` (MLflow,
a subscriber to committed events), `sessions` (the manager wiring them), `errors` (domain errors),
`models` (request/response bodies), `app` (FastAPI routers, HTTP statuses and `serve`), `files` (the
file protocol), `client` (an httpx client for rigs).
"""
