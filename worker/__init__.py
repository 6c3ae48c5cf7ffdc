"""The qvl worker: one process that holds a Qwen3-VL model on one device and answers batches.

Started by the supervisor as `python -m qvl.worker`. Importing this package imports nothing
heavy; torch and transformers load inside the process that runs the model.
"""
