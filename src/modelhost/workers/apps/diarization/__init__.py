"""The speaker diarization worker: who spoke when, over resemblyzer or pyannote.

    steps.py    the pure steps (turns, voice-activity masks, clustering, smoothing, RTTM)
    engines.py  the resemblyzer pipeline and the pyannote engine
    app.py      the HTTP face, the command line and `main` (`python -m` runs it)
"""
