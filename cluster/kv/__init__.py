"""The chunk-KV layer: the Redis index of chunks, the stores that hold them and the paths that move them (gRPC,
NCCL/gloo collectives, CUDA IPC). Imports only pdllm below the cluster and `pdllm.cluster.common`."""
