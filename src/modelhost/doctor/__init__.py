"""`modelhost doctor`: checks of the host the gateway will run on (docs/doctor.md).

One module per concern, each importing only those listed before it:

- `rules`: every check's `Rule` (id, title, severity, why), described once.
- `versions`: torch's and vLLM's versions and CUDA, read from their files (standard library
  only: it also runs in other interpreters); `engines`: it, for each environment workers
  run from.
- `nvml`: the driver, its CUDA, each GPU's memory and compute capability.
- `needs`: what the configured models ask (GPUs, downloads, quantization).
- `context`: `Host` (where to look) and `Context` (what every check reads).
- the checks: `gpu` (driver, CUDA, vLLM), `fit` (GPU memory, compute capability),
  `system` (container, shared memory), `files` (disk, writable directories), `network`
  (the API port), `token` (the Hugging Face token).
- `runner`: `diagnose(settings, host)`, the report of them all.

The findings and their report forms are `checks/report.py`'s, shared with `modelhost check`.
"""

from modelhost.doctor.context import Host
from modelhost.doctor.runner import diagnose

__all__ = ["Host", "diagnose"]
