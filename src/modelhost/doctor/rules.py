"""Every check `modelhost doctor` makes, described once (docs/doctor.md lists them, a test
keeps the two equal).

A check produces one finding per rule (or one per model or directory it looks at):
`PASSED` with what was seen, `FAILED` with the reason and the fix, or `NOT_APPLICABLE` with
why it cannot apply here (no GPU, not in a container, no vLLM model configured).
"""

from __future__ import annotations

from modelhost.checks.report import Rule, Severity

ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

CONFIG = Rule(
    "doctor.config", "The models file loads", ERROR,
    "The checks below compare the host with the configured models; an invalid models file "
    "also stops `modelhost serve`.")
GPU_DRIVER = Rule(
    "doctor.gpu.driver", "The NVIDIA driver answers", ERROR,
    "The gateway reads the GPUs through NVML and every GPU worker needs the driver; a driver "
    "that is installed but not loaded, or whose library and kernel module disagree, leaves "
    "every GPU model unable to start.")
GPU_CUDA = Rule(
    "doctor.gpu.cuda", "The driver supports the CUDA that torch and vLLM were built for", ERROR,
    "A CUDA runtime newer (in its major version) than the driver supports fails at the first "
    "CUDA call ('CUDA driver version is insufficient for CUDA runtime version').")
GPU_CUDA_MINOR = Rule(
    "doctor.gpu.cuda-minor", "The driver is not older than the CUDA minor version in use", WARNING,
    "Within one major version CUDA runs on an older driver through minor-version "
    "compatibility, but kernels compiled just in time from PTX (and some libraries) fail "
    "with 'the provided PTX was compiled with an unsupported toolchain'.")
VLLM_INSTALL = Rule(
    "doctor.vllm.install", "vLLM is installed, with the torch it was built against", ERROR,
    "A vLLM model starts `vllm serve` from its environment (the gateway's own, or the "
    "model's `python:`); vLLM's compiled kernels load only with the exact torch release "
    "they were built against (otherwise: 'undefined symbol' at import).")
GPU_MEMORY = Rule(
    "doctor.gpu.memory", "The GPUs are large enough for each GPU model", ERROR,
    "A model whose weights and cache cannot fit on the GPUs it is given, or that is pinned "
    "to a GPU that does not exist, can never start.")
GPU_FREE = Rule(
    "doctor.gpu.free-memory", "Each GPU model fits in the memory free now", WARNING,
    "vLLM refuses to start when a GPU has less free memory than gpu_memory_utilization of "
    "its total; memory held by other programs must be freed first.")
GPU_CAPABILITY = Rule(
    "doctor.gpu.capability", "Each GPU has the compute capability its models need", ERROR,
    "vLLM's kernels need compute capability 7.0; its Marlin kernels (awq_marlin, "
    "gptq_marlin, fp8 on Ampere) and bfloat16 need 8.0. On an older GPU the worker fails at "
    "start. The scheduler places models by free memory only, so every GPU a model may be "
    "placed on must qualify.")
GPU_KERNELS = Rule(
    "doctor.gpu.kernels", "Quantized checkpoints get their fast kernels", WARNING,
    "On a GPU below compute capability 8.0 vLLM runs an AWQ checkpoint with its older AWQ "
    "kernels instead of Marlin: slower, and deprecated upstream.")
CONTAINER = Rule(
    "doctor.container.runtime", "The container sees the NVIDIA devices", ERROR,
    "Inside a container the GPUs exist only when the container was started by the NVIDIA "
    "container runtime (`--gpus`, or a compose device reservation), which adds /dev/nvidia* "
    "and the driver's libraries.")
SHM = Rule(
    "doctor.shm", "Shared memory is large enough for vLLM", WARNING,
    "vLLM's workers and NCCL exchange tensors through /dev/shm; a container's default of "
    "64 MiB makes tensor parallelism fail or hang ('unhandled system error', bus error).")
DISK = Rule(
    "doctor.disk.cache", "The model cache has room for the models still to download", ERROR,
    "A download that runs out of disk stops part way; the downloader also refuses to start "
    "one that would leave less than 1 GiB free.")
DISK_SIZES = Rule(
    "doctor.disk.model-sizes", "The size of every model to download is known", INFO,
    "The size of a hub model is known once its file listing is in the cache (after a first "
    "download, or a download started and cancelled); until then the disk check cannot tell "
    "whether it fits.")
DIRS = Rule(
    "doctor.dirs.writable", "The data, log and cache directories are writable", ERROR,
    "The gateway keeps its database in the data directory and writes its log file in the log "
    "directory at start; downloads write to the model cache. It stops at start when it "
    "cannot.")
PORTS = Rule(
    "doctor.ports", "The API address is free", ERROR,
    "`modelhost serve` binds API_HOST:API_PORT and exits at once when another program (or "
    "another gateway) holds it.")
HF_TOKEN = Rule(
    "doctor.hf.token", "The Hugging Face token is well-formed", ERROR,
    "A malformed token is refused by the hub (401) on every download, even of public "
    "models, since it is sent with each request.")
HF_TOKEN_MISSING = Rule(
    "doctor.hf.token-missing", "A token is set when models are to be downloaded", INFO,
    "Public repositories download without a token; gated (Llama, Gemma, ...) and private "
    "ones need one, and the hub rate-limits anonymous downloads more.")

RULES: tuple[Rule, ...] = (
    CONFIG, GPU_DRIVER, GPU_CUDA, GPU_CUDA_MINOR, VLLM_INSTALL, GPU_MEMORY, GPU_FREE,
    GPU_CAPABILITY, GPU_KERNELS, CONTAINER, SHM, DISK, DISK_SIZES, DIRS, PORTS, HF_TOKEN,
    HF_TOKEN_MISSING,
)
