"""Training: the loop (DeepSpeed engine over the method's objective), checkpoints and resume, the run log, the
best-validation adapter and the start-up checks of a run directory. The loop ends at the PEFT adapter;
evaluation is a separate step (hiddenkey_ds.evaluation), which `python -m hiddenkey_ds.train` runs after it
when the recipe asks (eval.at_end).
"""
