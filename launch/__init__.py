"""Scripts that start runs: several local processes, a Cloud TPU slice, a SLURM job, a sweep."""
