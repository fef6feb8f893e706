"""The per-GPU memory planner: `hiddenkey-ds plan RECIPE.yaml --gpus-per-node N --gpu-mem-gib G`."""
