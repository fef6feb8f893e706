"""Experiments built on training and evaluation: reports over runs (report.py), sweeps of methods x seeds x
tasks with validation-based selection (sweep.py), and the offline demo (demo.py, demo_data.py).
"""
