"""Ray actor pools for the three stages, the DiT rank group, the stage scheduler, the job store and the batch runner."""
