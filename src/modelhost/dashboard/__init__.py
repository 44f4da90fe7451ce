"""The web dashboard (docs/dashboard.md): `Dashboard(...).routes()` are mounted by
`app.build_app`."""

from modelhost.dashboard.routes import PREFIX, Dashboard

__all__ = ["PREFIX", "Dashboard"]
