"""The speech worker: OpenAI's audio routes over faster-whisper or NVIDIA Canary.

    engine.py    what an engine is given and answers (SpeechRequest, Transcript, protocols)
    requests.py  OpenAI's form fields to a SpeechRequest, refused (400) when bad
    formats.py   a Transcript as json, text, srt, verbose_json or vtt
    whisper.py   the faster-whisper engine (the default; the embedded tiny.en)
    canary.py    the NVIDIA Canary engine through NeMo (optional)
    app.py       the HTTP face, the command line and `main` (`python -m` runs it)
"""
