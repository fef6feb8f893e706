"""Evaluation with lm-evaluation-harness: `hiddenkey-ds eval RUN_DIR` scores a run's adapters on its task
(harness.py), and the command that runs it as its own process (command.py).
"""
