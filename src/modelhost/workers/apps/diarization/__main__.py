"""`python -m modelhost.workers.apps.diarization`: the diarization worker (app.py), as the
gateway starts it (workers/plans.py)."""

from modelhost.workers.apps.diarization.app import main

main()
