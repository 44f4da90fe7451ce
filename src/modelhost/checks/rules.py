"""Every rule of `modelhost check`, in one place. docs/check.md lists them (a test keeps the
two equal) and tests/test_check_rules.py has one case per rule.

Ids are stable: `family.name`, the family being what is examined (compose, dockerfile, env,
models, settings) or, for rules that apply to a vLLM server wherever it is declared (a
compose service or a models-file entry), `vllm`; `secrets` for secrets in any file.
"""

from __future__ import annotations

from modelhost.checks.report import Rule, Severity

E, W, N = Severity.ERROR, Severity.WARNING, Severity.INFO  # N: a note

# ----------------------------------------------------------------------------- input
INPUT_UNREADABLE = Rule(
    "input.unreadable", "File cannot be read or parsed", E,
    "A file that does not parse is refused by docker compose, docker build or modelhost "
    "itself; nothing else in it can be checked.")

NOT_RECOGNISED = Rule(
    "input.not-recognised", "File skipped: not a kind check knows", N,
    "Only compose files, models files, Dockerfiles and .env files are checked; a file named "
    "on the command line that is none of them (a Prometheus configuration, ...) is skipped.")

# ----------------------------------------------------------------------------- compose
IMAGE_UNPINNED = Rule(
    "compose.image-unpinned", "Image not pinned to a version", E,
    "`latest` (or no tag) is whatever was pushed last: a redeploy or a new host silently "
    "runs another version, and a rollback has nothing to go back to (the audit's blocking "
    "defect: vllm/vllm-openai:latest instead of v0.9.2).")
CONTAINER_NAME = Rule(
    "compose.container-name-missing", "Serving container has no container_name", W,
    "Compose then names the container after the project folder; monitoring, `docker logs` "
    "and the rollback commands of a runbook cannot find it by a stable name.")
HEALTHCHECK_MISSING = Rule(
    "compose.healthcheck-missing", "Service has no health check", W,
    "Without a health check Docker reports a hung or still-loading server as running; "
    "depends_on, load balancers and monitoring cannot tell it is not serving.")
HEALTHCHECK_START = Rule(
    "compose.healthcheck-start-period", "Health check start_period too short for the model", E,
    "Loading a large model (a 32B model: minutes) takes longer than the start period; "
    "failed probes then count and the container is marked unhealthy (or restarted by an "
    "orchestrator) while it is still loading.")
GPU_DEVICE_IDS = Rule(
    "compose.gpu-device-ids", "GPU device_ids given as one comma-joined string", E,
    "`device_ids: ['${CUDA_VISIBLE_DEVICES}']` is one list item: with the variable set to "
    "0,1 Docker is asked for a single device named \"0,1\" instead of GPUs 0 and 1 (and for "
    "a device named \"\" when the variable is unset).")
NO_GPU = Rule(
    "compose.gpu-missing", "vLLM service is given no GPU", E,
    "vLLM needs NVIDIA GPUs; without a GPU reservation (deploy.resources.reservations."
    "devices), `gpus:` or `runtime: nvidia` the container sees none and vLLM fails to start "
    "(\"Failed to infer device type\").")
SHARED_MEMORY = Rule(
    "compose.shared-memory", "vLLM container has too little shared memory", E,
    "Docker gives containers 64 MB of /dev/shm; vLLM's workers (tensor parallelism, "
    "NCCL, the multiprocessing executor) exchange tensors through it and crash or hang "
    "without `ipc: host` or a `shm_size` of a few GB.")
PORT_EXPOSED = Rule(
    "compose.port-exposed-without-key", "Port published on all interfaces with no API key", E,
    "`ports: - \"8000:8000\"` binds 0.0.0.0: anyone who can reach the host can use the "
    "model (and a modelhost gateway's admin API) when no key is required.")
PORT_CONFLICT = Rule(
    "compose.port-conflict", "Two services publish the same host port", E,
    "Only one can bind it; the second fails to start (\"port is already allocated\").")
GPU_CONFLICT = Rule(
    "compose.gpu-conflict", "Two services reserve the same GPU", W,
    "Two model servers sized for a whole GPU each (gpu-memory-utilization) on one GPU run "
    "out of memory when both start.")
NAME_CONFLICT = Rule(
    "compose.container-name-conflict", "Two services use the same container_name", E,
    "Container names are unique per Docker host; the second service cannot be created.")
CONFLICTING = Rule(
    "compose.conflicting-definitions", "Files describe the same service differently", W,
    "Two files for one service that disagree (the audit: image latest against v0.9.2, "
    "max-model-len 70000 against 131072, quantization in one only, ray against mp) mean "
    "what runs depends on which file a script happens to use.")
DUPLICATE_SERVICE = Rule(
    "compose.duplicate-service", "Same service described in several files", N,
    "`docker compose -f a -f b` merges them as overrides, while a script that uses one "
    "file deploys only that one; keep one source of truth.")
RUNS_AS_ROOT = Rule(
    "compose.runs-as-root", "Container runs as root", N,
    "A process escaping the server (or a model file loaded with remote code) has root in "
    "the container; images like vllm/vllm-openai run as root unless `user:` is set.")
EXPLICIT_ROOT = Rule(
    "compose.user-root", "Service explicitly runs as root or privileged", W,
    "`user: root`, `user: \"0\"` or `privileged: true` give the container full rights, "
    "more than any model server needs.")
UNDEFINED_VARIABLE = Rule(
    "compose.undefined-variable", "Variable used with no value and no default", N,
    "Compose substitutes an empty string (with a warning) for a variable that is neither "
    "in the environment nor in the .env file beside the compose file.")

# ----------------------------------------------------------------------------- vLLM
GPU_MEMORY = Rule(
    "vllm.gpu-memory-utilization", "gpu-memory-utilization outside 0.1..0.95", E,
    "Above 0.95 vLLM leaves too little for CUDA graphs, NCCL buffers and fragmentation: "
    "CUDA out of memory under load; below 0.1 there is no room for the KV cache.")
EXECUTOR = Rule(
    "vllm.executor-backend", "Tensor parallelism on one host without the mp executor", W,
    "Ray is for several nodes; on one host the multiprocessing executor "
    "(`--distributed-executor-backend mp`) starts faster and has fewer moving parts, and "
    "an unset backend may pick Ray when Ray is installed.")
SWAP_SPACE = Rule(
    "vllm.swap-space", "No swap space set", W,
    "Without `--swap-space` the CPU space for preempted sequences is the default 4 GiB; a "
    "large model under load then runs out of it (the audit's OOM risk).")
QUANT_IMPLICIT = Rule(
    "vllm.quantization-implicit", "Quantized checkpoint without --quantization", W,
    "Left implicit, the kernel is whatever this vLLM version detects (not always the "
    "fastest, e.g. awq instead of awq_marlin), and two files for one service may differ.")
QUANT_MISMATCH = Rule(
    "vllm.quantization-mismatch", "Quantization does not match the checkpoint", E,
    "The weights are in one format (config.json's quantization_config); a --quantization "
    "for another format makes vLLM refuse the model or load it wrongly.")
MAX_LEN = Rule(
    "vllm.max-model-len-exceeds-model", "max-model-len above the model's context length", E,
    "vLLM refuses a max-model-len above what config.json allows (max_position_embeddings, "
    "times a rope_scaling factor); forcing it gives garbage past the trained length.")
TP_GPUS = Rule(
    "vllm.tensor-parallel-gpus", "Tensor-parallel size does not match the GPUs given", E,
    "vLLM needs tensor-parallel-size x pipeline-parallel-size GPUs visible; more than given "
    "fails at start, fewer leaves reserved GPUs idle.")
TP_HEADS = Rule(
    "vllm.tensor-parallel-heads", "Tensor-parallel size does not divide the attention heads", E,
    "Each GPU takes an equal share of the attention heads; vLLM refuses a "
    "tensor-parallel-size that does not divide num_attention_heads.")
KEY_IN_COMMAND = Rule(
    "secrets.key-in-command", "API key written in the command line", W,
    "A literal `--api-key` is in the file, in `docker inspect` and in the process list; "
    "take it from an environment variable set in an uncommitted .env or a secret.")
PLAINTEXT = Rule(
    "secrets.plaintext", "Secret written in plain text", E,
    "A token in a compose file, Dockerfile or models file ends up in version control, in "
    "image layers and in `docker inspect`; anyone with read access can use it.")

# ----------------------------------------------------------------------------- Dockerfile
BASE_UNPINNED = Rule(
    "dockerfile.base-image-unpinned", "Base image not pinned to a version", E,
    "`FROM image` or `FROM image:latest` builds on whatever was pushed last: two builds of "
    "the same commit differ.")
DOCKER_ROOT = Rule(
    "dockerfile.runs-as-root", "Image runs as root", W,
    "With no USER (or USER root last) the server runs as root in the container.")
DOCKER_HEALTH = Rule(
    "dockerfile.healthcheck-missing", "Image has no HEALTHCHECK", N,
    "Without HEALTHCHECK, `docker ps` cannot tell a loading or hung server from a healthy "
    "one unless every compose file adds its own health check.")

# ----------------------------------------------------------------------------- .env
ENV_COMMITTED = Rule(
    "env.secret-committed", "Secrets in an .env file tracked by git", E,
    "Everything in the repository's history is readable by whoever can clone it, for "
    "ever; keep .env out of git (.gitignore) and commit an example without values.")
ENV_PERMISSIONS = Rule(
    "env.permissions", "Secrets in a file others can read", N,
    "A token in a group- or world-readable file is readable by every user of the host; "
    "chmod 600. (An info: an .env file is where the audit keeps the token, and a fresh "
    "checkout makes files readable by all.)")
TOKEN_FORMAT = Rule(
    "env.hf-token-format", "Hugging Face token is not well-formed", W,
    "Hugging Face user access tokens start with hf_; anything else is refused at the "
    "first download (\"Token authentication failed\").")

# ----------------------------------------------------------------------------- modelhost
MODELS_INVALID = Rule(
    "models.invalid", "Models file does not validate", E,
    "modelhost refuses to start with a models file that does not validate.")
MODELS_MISSING = Rule(
    "models.file-missing", "Configured models file does not exist", E,
    "MODELHOST_CONFIG (or --config) names a file that is not there: modelhost refuses "
    "to start.")
START_TIMEOUT = Rule(
    "models.start-timeout", "start_timeout too short for the model", W,
    "A worker that does not answer its readiness probe within start_timeout is stopped "
    "and counted as a failed start; a large vLLM model takes minutes to load.")
EXPOSED = Rule(
    "settings.exposed-without-keys", "Gateway listens on a public address with no key", E,
    "With API_HOST on a non-loopback address and no OPENAI_API_KEYS / MODELHOST_ADMIN_KEYS, "
    "anyone who can reach it uses every model and the admin API (modelhost refuses to "
    "serve so, unless MODELHOST_INSECURE_NO_AUTH says otherwise).")

ALLOW_CODE = Rule(
    "settings.admin-allow-code", "Admin API may run code on a public address", W,
    "With MODELHOST_ADMIN_ALLOW_CODE the admin API may set commands, interpreters, "
    "environment and local paths: an admin key reachable from the network runs code on "
    "the host.")
ANY_HOST = Rule(
    "settings.allowed-hosts-any", "Any Host header is accepted", W,
    "MODELHOST_ALLOWED_HOSTS=* turns off the Host check that stops DNS rebinding: a web page "
    "can then reach a gateway on loopback or a private network through the browser.")
SHARED_NO_KEY = Rule(
    "settings.shared-database-without-secret-key",
    "Gateways share a database but have no secret key", W,
    "With MODELHOST_DATABASE_URL on PostgreSQL several gateways serve the same models, but "
    "without MODELHOST_SECRET_KEY the secrets of a model added through the admin API (a "
    "remote server's key, ...) stay in the data folder of the gateway it was added through: "
    "the others cannot serve it.")

WORKER_EXPOSED = Rule(
    "settings.worker-host-exposed", "Workers listen on a non-loopback address", W,
    "With MODELHOST_WORKER_HOST off loopback (gateways on several machines relaying to each "
    "other's workers), every worker listens there without a key: anyone who reaches that "
    "address and port uses the model directly, past the gateway's keys, limits and audit.")

RULES: dict[str, Rule] = {
    rule.id: rule for rule in (
        INPUT_UNREADABLE, NOT_RECOGNISED,
        IMAGE_UNPINNED, CONTAINER_NAME, HEALTHCHECK_MISSING, HEALTHCHECK_START,
        GPU_DEVICE_IDS, NO_GPU, SHARED_MEMORY, PORT_EXPOSED, PORT_CONFLICT, GPU_CONFLICT,
        NAME_CONFLICT, CONFLICTING, DUPLICATE_SERVICE, RUNS_AS_ROOT, EXPLICIT_ROOT,
        UNDEFINED_VARIABLE,
        GPU_MEMORY, EXECUTOR, SWAP_SPACE, QUANT_IMPLICIT, QUANT_MISMATCH, MAX_LEN, TP_GPUS,
        TP_HEADS, KEY_IN_COMMAND, PLAINTEXT,
        BASE_UNPINNED, DOCKER_ROOT, DOCKER_HEALTH,
        ENV_COMMITTED, ENV_PERMISSIONS, TOKEN_FORMAT,
        MODELS_INVALID, MODELS_MISSING, START_TIMEOUT, EXPOSED, ALLOW_CODE, ANY_HOST,
        WORKER_EXPOSED,
        SHARED_NO_KEY,
    )
}
