"""Hugging Face downloads: progress, resume, cancel, verification; cache inspection.

One module per concept, each importing only those listed before it:

- `cache`: the model cache in the Hub's own layout (shared with other tools): paths, refs,
  listings, snapshots; `is_complete`, `scan_cache`, `delete_from_cache`.
- `errors`: `DownloadError` and its `ErrorKind`; `explain` turns whatever a download raised
  into a message that says what to do.
- `fetch`: the blocking half of a job, in worker threads: plan (revision, listing, disk
  check), resumable streamed GET with the hash computed on the way, locks, stop switch.
- `jobs`: `Downloader`, the job manager (one `DownloadJob` per model, queue, progress
  events, cancel, shutdown).
"""

from modelhost.downloads.cache import is_complete
from modelhost.downloads.errors import DownloadError
from modelhost.downloads.jobs import Downloader, DownloadJob, JobState

__all__ = ["DownloadError", "DownloadJob", "Downloader", "JobState", "is_complete"]
