"""The rig service: closed-loop sessions a lab drives a living neuron with, over HTTP or a folder.

`models` (request/response bodies), `sessions` (durable session log, optimizer replay, MLflow),
`app` (FastAPI routers and `serve`), `files` (the file protocol), `client` (an httpx client for rigs).
"""
