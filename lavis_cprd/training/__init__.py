"""The LAVIS integration: the task, the runner, launching, batch sampling, the LAVIS 1.0.2 patches."""
