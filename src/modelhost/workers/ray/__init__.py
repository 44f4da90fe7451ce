"""What runs on the nodes of a Ray cluster (issue 18): a worker's supervisor and each node's
GPU probe, as Ray actors. The gateway's side is `workers.ray_launcher`."""
