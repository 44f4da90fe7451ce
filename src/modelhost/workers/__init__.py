"""Worker processes: what a worker is (a backend's launch plan) and how it is supervised."""
