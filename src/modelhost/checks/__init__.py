"""Pre-flight checks: `modelhost check` (files: the models file, compose files, Dockerfiles,
`.env` files, the settings) and `modelhost doctor` (the host).

Both speak through `report`: a `Rule` is described once (id, title, severity, why), a
`Finding` is one rule applied to one place, a `Report` renders as text, JSON or SARIF.
The rules of `check` are registered in `rules.RULES`; docs/check.md lists them.
"""
