"""GPUs: what the machine has (NVML inventory and live samples, `inventory`) and where a model
goes (pure placement and eviction decisions, `placement`).

With no NVIDIA GPU or no driver, modelhost runs every model on the CPU and says why once.
"""
