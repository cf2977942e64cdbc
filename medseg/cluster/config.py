"""Cluster settings: ``WORK/cluster.json`` (so that nobody retypes them), overridden per command
by ``--partition``, ``--gpus-per-job``, ``--cpus-per-job``, ``--mem-gb``, ``--time``,
``--account``, ``--qos`` and repeatable ``--slurm KEY=VALUE`` (any sbatch option)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medseg.errors import MedsegError
from medseg.utils import atomic_write_json, load_json_model


class ClusterConfig(BaseModel):
    """How each job is submitted. ``time_min`` is the job's time limit: a training job that reaches
    it (or is preempted) gets Slurm's signal ``signal_delay_s`` seconds before, and requeues itself to
    resume from its latest checkpoint; ``max_timeouts`` bounds how often it may do so on time
    limits (preemptions do not count)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    gpus_per_job: int = Field(0, ge=0)
    cpus_per_job: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int = Field(24 * 60, ge=1)
    account: str | None = None
    qos: str | None = None
    slurm: dict[str, str | bool] = Field(default_factory=dict,
                                         description="further sbatch options, without the dashes (true: a flag)")
    signal_delay_s: int = Field(120, ge=1)
    max_timeouts: int = Field(10, ge=0)

    @classmethod
    def load(cls, path: Path) -> ClusterConfig:
        return load_json_model(cls, path) if path.exists() else cls()

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.model_dump(exclude_defaults=True))

    def merged(self, **overrides: Any) -> ClusterConfig:
        """These settings with every override that is not None; ``slurm`` options are added to the file's."""
        values = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            values[key] = {**values["slurm"], **value} if key == "slurm" else value
        return ClusterConfig.model_validate(values)

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit's ``SlurmExecutor`` parameters. Jobs may be requeued (preemption, time limit), and a
        job whose dependency can never be satisfied (a job it waits for failed) is cancelled."""
        params: dict[str, Any] = {"time": self.time_min, "signal_delay_s": self.signal_delay_s}
        for key, value in (("partition", self.partition), ("cpus_per_task", self.cpus_per_job),
                           ("account", self.account), ("qos", self.qos)):
            if value is not None:
                params[key] = value
        if self.gpus_per_job:
            params["gpus_per_node"] = self.gpus_per_job
        if self.mem_gb is not None:
            params["mem"] = f"{max(1, round(self.mem_gb * 1024))}M"
        params["additional_parameters"] = {"requeue": True, "kill-on-invalid-dep": "yes", **self.slurm}
        return params


def parse_slurm_options(values: list[str] | None) -> dict[str, str | bool] | None:
    """``["constraint=a100", "exclusive="]`` → ``{"constraint": "a100", "exclusive": True}`` (an empty value is a flag)."""
    if not values:
        return None
    options: dict[str, str | bool] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise MedsegError(f"--slurm {item!r}: expected KEY=VALUE (an sbatch option, e.g. constraint=a100)")
        options[key] = value if value else True
    return options
