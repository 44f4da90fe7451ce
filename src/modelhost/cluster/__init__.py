"""Several gateways sharing one PostgreSQL database (docs/scale-out.md).

Nothing here runs when the state database is SQLite (one gateway, the default).

* `locks`: session-level advisory locks on a connection of their own: who owns a model's
  lifecycle (starts its worker), who downloads a model's weights.
* `notify`: LISTEN for the spec changes the other gateways commit (NOTIFY is sent in the
  change's own transaction, `db.workers.notify_change`).
* `launcher`: the launcher every model's start goes through: the owner starts the worker
  and publishes its address (`model_workers`), the others relay to that address and take
  over when the owner's lock is released (its gateway died, or it unloaded the model).
* `member`: one gateway's part, started and stopped with the gateway; `changes`: a change
  heard of applied to this gateway's registry.
"""
