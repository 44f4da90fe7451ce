"""modelhost's own worker apps: small OpenAI-compatible servers for what no engine serves
(speech, diarization, embeddings), each run as a supervised child process like any worker."""
