"""The trainer's building blocks, below the trainer and the tasks.

Checkpoints, optimizer, sharding, EMA, monitoring and writers, the run record, memory checks, the workdir
lock, profiling.
"""
