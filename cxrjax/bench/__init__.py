"""`cxrjax bench`: throughput, step and compile time, memory and FLOPs of the real
training and inference steps, with PyTorch and Keras peers measured in the same run.

The parent process (`run`) imports no framework: every case runs in a fresh Python
process (`worker`) so that each gets its own device-memory peak, JAX's preallocation
never starves PyTorch, Keras can pick its backend, and one out-of-memory case cannot
end the run. Nothing here imports grain, wandb or tensorflow-datasets except the
grain-fed step, which does so lazily when `--prepared` is given.
"""
