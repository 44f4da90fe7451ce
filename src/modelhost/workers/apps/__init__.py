"""modelhost's own worker apps: small OpenAI-compatible servers for what no engine serves
(speech, diarization, embeddings), each run as a supervised child process like any worker.

Each app declares its engine and its routes; skeleton.py gives them the rest (the command line,
the model loaded before the port opens, /v1/models, /health, the error envelope, uvicorn), and
audio_input.py decodes the audio apps' uploads under a duration cap."""
