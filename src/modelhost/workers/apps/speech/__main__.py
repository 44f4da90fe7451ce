"""`python -m modelhost.workers.apps.speech`: the speech worker (app.py), as the gateway
starts it (workers/plans.py)."""

from modelhost.workers.apps.speech.app import main

main()
