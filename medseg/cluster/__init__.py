"""Batch jobs on a Slurm cluster through submitit: the settings (:mod:`.config`), the scheduler's
view of jobs (:mod:`.slurm`) and the work that runs in them (:mod:`.jobs`)."""
