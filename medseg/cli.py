"""The ``medseg`` command line: a thin typed layer over the library.

Each command calls one API function. Any :class:`~medseg.errors.MedsegError` becomes a one-line
message on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperCommand

from medseg.errors import MedsegError
from medseg.workdir import WorkDir

# Each command imports what it runs inside its own function: `import medseg.cli` takes 0.1 s, and
# `medseg --help` 0.7 s wall, where importing every command's modules at the top (workflow,
# training, inference: torch and MONAI) would cost ~6 s on 2 cores before any command starts.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-configuring medical image segmentation.")
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")


@app.command()
def check(dataset: Path = typer.Argument(..., help="Dataset folder (MSD, nnU-Net v2 or imagesTr/+labelsTr/).")) -> None:
    """Check a dataset: geometry, labels, channels, NaN/Inf, missing files. Exit 2 on any problem."""
    from medseg.io.check import check_dataset
    from medseg.io.dataset import load_dataset

    ds = load_dataset(dataset)
    for note in ds.notes:
        console.print(f"[yellow]note:[/] {note}")
    problems = check_dataset(ds)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise typer.Exit(2)
    console.print(f"[green]ok[/]: {len(ds.cases)} cases, {ds.num_channels} channel(s), labels {sorted(ds.labels)}")


def _configs(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _device(value: str | None) -> str:
    from medseg.utils import resolve_device

    return resolve_device(value)


# ---------------------------------------------------------------- --executor local|slurm

_CLUSTER_OPTIONS = [
    ("executor", str, typer.Option("local", "--executor", help="local, or slurm: submit as Slurm job(s) through "
                                   "submitit and return at once with the job ids (see docs/cluster.md).")),
    ("partition", str, typer.Option(None, "--partition", help="Slurm: partition (default: cluster.json's).")),
    ("gpus_per_job", int, typer.Option(None, "--gpus-per-job", help="Slurm: GPUs per job.")),
    ("cpus_per_job", int, typer.Option(None, "--cpus-per-job", help="Slurm: CPUs per job.")),
    ("mem_gb", float, typer.Option(None, "--mem-gb", help="Slurm: memory per job (GB).")),
    ("time_min", int, typer.Option(None, "--time", help="Slurm: time limit per job in minutes; a training job "
                                   "reaching it requeues itself and resumes.")),
    ("account", str, typer.Option(None, "--account", help="Slurm: account.")),
    ("qos", str, typer.Option(None, "--qos", help="Slurm: quality of service.")),
    ("slurm", list[str], typer.Option(None, "--slurm", help="Slurm: any sbatch option as KEY=VALUE (repeatable; "
                                      "KEY= for a flag).")),
]


def cluster_options(command: Callable) -> Callable:
    """Add ``--executor`` and the Slurm settings to ``command``, which receives them as one argument
    ``cluster``: None for ``--executor local``, else a function of the work directory giving its
    ``cluster.json`` settings with the options given here on top."""
    sig = inspect.signature(command)
    params = [p for p in sig.parameters.values() if p.name != "cluster"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
             for name, kind, default in _CLUSTER_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {name: kwargs.pop(name) for name, _, _ in _CLUSTER_OPTIONS}
        executor = given.pop("executor")
        if executor not in ("local", "slurm"):
            raise MedsegError(f"--executor {executor!r}: expected local or slurm")
        if executor == "local":
            used = [f"--{n.replace('_', '-')}" for n, v in given.items() if v]
            if used:
                raise MedsegError(f"{used[0]} needs --executor slurm")
            return command(cluster=None, **kwargs)

        from medseg.cluster.config import ClusterConfig, parse_slurm_options  # deferred: only for slurm

        given["slurm"] = parse_slurm_options(given["slurm"])

        def settings(workdir: Path):
            return ClusterConfig.load(WorkDir(workdir).cluster_config).merged(**given)

        return command(cluster=settings, **kwargs)

    del wrapper.__wrapped__  # typer reads the signature below, not the command's
    wrapper.__signature__ = sig.replace(parameters=[*params, *extra])
    wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "cluster"},
                               **{name: kind for name, kind, _ in _CLUSTER_OPTIONS}}
    return wrapper


def _print_jobs(ids: dict[str, list[str]]) -> None:
    for stage, job_ids in ids.items():
        if job_ids:
            console.print(f"[green]submitted[/] {stage}: {', '.join(job_ids)}")
    console.print("follow them with [bold]medseg jobs WORK[/]")


class _PlanCommand(TyperCommand):
    """``plan``, whose ``--variants`` help lists the variant registry, read only when the help is
    shown: the registry holds the network blocks, whose import (torch, MONAI: ~3 s on 2 cores) no
    other use of the CLI should pay."""

    def format_help(self, ctx, formatter) -> None:
        from medseg.networks.variants import VARIANTS, presets

        for param in self.params:
            if param.name == "variants":
                param.help = (f"Network variants, comma-separated: {', '.join(VARIANTS)} "
                              f"(preset: {', '.join(presets())}); one configuration each.")
        super().format_help(ctx, formatter)


@app.command(cls=_PlanCommand)
@cluster_options
def plan(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Work directory for plans, data, runs."),
    memory_gb: float = typer.Option(None, "--memory-gb", help="Memory budget in GB (default on CUDA: min(8, 0.8 × (the "
                                   "device's memory - 1)), portable to 11 GB cards like nnU-Net's; on a CPU a "
                                   "quarter of RAM, at most 8)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    configs: str = typer.Option(None, "--configs",
                                help="Comma-separated: 2d, 3d_fullres, 3d_lowres (adds the low-resolution stage and "
                                     "3d_cascade_fullres only when the full-resolution patch covers < 25% of the "
                                     "median image). Default: all three."),
    time_budget: float = typer.Option(None, "--time-budget", help="CPU: training minutes to plan for (default 30)."),
    variants: str = typer.Option("plain", "--variants",
                                 help="Network variants, comma-separated (preset: all); one configuration each."),
    no_preprocess: bool = typer.Option(False, "--no-preprocess", help="Only fingerprint and plan."),
    remeasure: bool = typer.Option(False, "--remeasure", help="CPU: measure training step times again instead of "
                                   "reusing those remembered for this machine ($MEDSEG_HOME/step_times.json)."),
    workers: int = typer.Option(None, "--workers", help="Parallel processes (default: CPU count, at most 8)."),
    plans_from: Path = typer.Option(None, "--plans-from", help="A trained work directory whose configurations "
                                    "(spacing, patch, topology, blocks) to take, so that its weights fit "
                                    "(`train --init-from`); normalisation and labels come from this dataset."),
    cluster=None,
) -> None:
    """Check, fingerprint and plan a dataset, then preprocess it."""
    if cluster is not None and plans_from is not None:
        raise MedsegError("--plans-from runs locally (it measures nothing); leave out --executor slurm")
    if cluster is not None:
        from medseg.cluster.jobs import submit_plan

        _print_jobs({"plan": submit_plan(dataset, output, cluster(output), memory_gb=memory_gb, device=device,
                                         configs=_configs(configs), time_budget_min=time_budget,
                                         preprocess=not no_preprocess, variants=_configs(variants),
                                         remeasure=remeasure)})
        return
    from medseg import workflow

    workflow.plan(dataset, output, memory_gb=memory_gb, device=device, configs=_configs(configs),
                  time_budget_min=time_budget, preprocess=not no_preprocess, num_workers=workers, progress=True,
                  variants=_configs(variants), remeasure=remeasure, plans_from=plans_from)
    console.print(workflow.info(output))
    console.print(f"[green]plans written to[/] {WorkDir(output).plans}")


@app.command()
def preprocess(
    workdir: Path = typer.Argument(..., help="Work directory made by `medseg plan`."),
    configs: str = typer.Option(None, "--configs", help="Comma-separated configurations (default: all)."),
    workers: int = typer.Option(None, "--workers"),
) -> None:
    """Preprocess (again) the planned configurations; finished cases are skipped."""
    from medseg import workflow

    done = workflow.preprocess(workdir, _configs(configs), workers, progress=True)
    console.print(f"preprocessed: {done}")


@app.command()
def info(workdir: Path = typer.Argument(..., help="Work directory made by `medseg plan`.")) -> None:
    """Print the plan (spacing, patch, batch, stages, features) and the reasons behind it."""
    from medseg import workflow

    print(workflow.info(workdir))


@app.command()
@cluster_options
def train(
    workdir: Path = typer.Argument(..., help="Work directory made by `medseg plan`."),
    config: str = typer.Option(None, "-c", "--config", help="Configuration, or several comma-separated "
                               "(trained one after the other; with --executor slurm one job array over all). "
                               "Default: the plan's choice for its budget (`medseg info`: 'train by default')."),
    fold: str = typer.Option("0", "-f", "--fold",
                             help="0..4, 'all' (the five cross-validation folds, then the out-of-fold report) "
                                  "or 'full' (one model on every case)."),
    epochs: int = typer.Option(None, "--epochs"),
    iterations: int = typer.Option(None, "--iterations-per-epoch"),
    time_budget: float = typer.Option(None, "--time-budget", help="Wall-clock minutes for the training loop."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run (also extends a finished one)."),
    device: str = typer.Option(None, "--device"),
    workers: int = typer.Option(None, "--workers", help="Augmentation processes (default: 1 on CPU, up to 8 on CUDA)."),
    no_validation: bool = typer.Option(False, "--no-validation", help="Skip the final full validation."),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes (torch.distributed; the plan's batch is "
                              "split among them): on this machine, or with --executor slurm per node (default "
                              "there: --gpus-per-node)."),
    nodes: int = typer.Option(None, "--nodes", help="Slurm: nodes per training job (distributed over all of them)."),
    gpus_per_node: int = typer.Option(None, "--gpus-per-node", help="Slurm: GPUs per node, one process each."),
    init_from: str = typer.Option(None, "--init-from", help="TRAINED_WORK[:config[:fold]]: start from those final "
                                  "weights (plan with `--plans-from TRAINED_WORK` so that they fit); tensors whose "
                                  "shapes differ are re-initialised and named in the log."),
    freeze_encoder_epochs: int = typer.Option(0, "--freeze-encoder-epochs",
                                              help="With --init-from: the encoder stays fixed for N first epochs."),
    cluster=None,
) -> None:
    """Train one fold, all five (-f all) or one model on every case (-f full) of a configuration."""
    options = {"epochs": epochs, "iterations_per_epoch": iterations, "time_budget_min": time_budget,
               "num_workers": workers, "validate_full": not no_validation}
    if init_from or freeze_encoder_epochs:
        options |= {"init_from": init_from, "freeze_encoder_epochs": freeze_encoder_epochs}
    if config is None:
        from medseg.plans.schema import Plans

        config = ",".join(Plans.load(WorkDir(workdir).plans).default_configurations())
    if cluster is not None:
        from medseg.cluster.jobs import submit_training

        # the device is chosen on the node (CUDA when the job has a GPU) unless --device says
        _print_jobs(submit_training(workdir, _configs(config), fold, cluster(workdir), device=device,
                                    nodes=nodes, gpus_per_node=gpus_per_node,
                                    tasks_per_node=nproc if nproc > 1 else None, **options))
        return
    if nodes or gpus_per_node:
        raise MedsegError(f"{'--nodes' if nodes else '--gpus-per-node'} needs --executor slurm")
    from medseg.orchestration.crossval import check_split, train_configs

    args = (workdir, _configs(config), fold)
    kwargs = {"resume": resume, "device": _device(device), "progress": True, **options}
    if nproc > 1:
        from medseg.training.distributed import launch

        check_split(workdir, _configs(config), nproc)
        summary = launch(nproc, train_configs, *args, **kwargs)
    else:
        summary = train_configs(*args, **kwargs)
    for line in summary:
        console.print(line)


@app.command()
@cluster_options
def predict(
    input: Path = typer.Option(..., "-i", "--input", help="Image file, folder of images, or DICOM folder tree."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    model: Path = typer.Option(..., "-m", "--model", help="Work directory with trained runs, or a model archive "
                               "(.zip from `medseg export-model`)."),
    config: str = typer.Option(None, "-c", "--config",
                               help="Configuration (default: model.json from `medseg find-best`, else 3d_fullres)."),
    folds: str = typer.Option(None, "-f", "--folds",
                              help="Comma-separated folds, or 'full' (default: model.json's, else all finished)."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="Mirroring test-time augmentation (default: as "
                                    "model.json decided on cross-validation, else on)."),
    step: float = typer.Option(0.5, "--step", help="Sliding-window step as a fraction of the patch."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities"),
    save_attention: bool = typer.Option(False, "--save-attention",
                                        help="Also write <case>_attention: the attention gates' coefficients "
                                             "(one volume per gate, full resolution first)."),
    save_uncertainty: bool = typer.Option(False, "--save-uncertainty",
                                          help="Also write <case>_uncertainty: normalised predictive entropy over "
                                               "all models (0 certain .. 1 uniform)."),
    no_postprocessing: bool = typer.Option(False, "--no-postprocessing", help="Ignore model.json's postprocessing."),
    statistics: bool = typer.Option(False, "--statistics", help="Per case and structure: volume (ml), voxel count, "
                                    "mean/std intensity per channel → predict_statistics.json/.csv."),
    preview: bool = typer.Option(False, "--preview", help="One PNG per case (<case>_preview.png): three orthogonal "
                                 "slices with the structures overlaid and named."),
    series: str = typer.Option(None, "--series",
                               help="DICOM: which series, as modality=MR,description=REGEX,uid=UID (default: per "
                                    "study, the one series whose modality fits the model)."),
    output_format: str = typer.Option("nifti", "--output-format", help="nifti, dicom-seg (DICOM input) or both."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    device: str = typer.Option(None, "--device"),
    num_parts: int = typer.Option(1, "--num-parts", help="Split the cases into this many disjoint, deterministic "
                                  "shards (sorted case ids, every N-th) and predict only --part of them."),
    part: int = typer.Option(0, "--part", help="Which shard, 0..N-1; several shards may write into one folder."),
    shards: int = typer.Option(None, "--shards", help="Slurm: one job array of this many shards."),
    stitch_device: str = typer.Option("auto", "--stitch-device",
                                      help="Where the sliding window's stitched output lives: auto (the GPU when "
                                           "it fits comfortably in its free memory, else the CPU), cpu or cuda:N."),
    backend: str = typer.Option(None, "--backend",
                                help="The network's forward pass: torch, or on a CPU onnxruntime, onnxruntime-int8, "
                                     "openvino, openvino-int8 (pip install 'medseg[cpu-fast]'; see "
                                     "docs/benchmarks.md). Default: model.json's choice, else torch."),
    cluster=None,
) -> None:
    """Segment new images; outputs have the input's exact geometry. Writes predict_summary.json/.csv
    with each case's QC score (flagged when above model.json's threshold)."""
    fold_list = None
    if folds:
        fold_list = [f if not f.isdigit() else int(f) for f in _configs(folds)]
    if model.is_file():  # a model archive (`medseg export-model`): unpacked once under $MEDSEG_HOME/models
        from medseg.inference.archive import cached_import

        model = cached_import(model)
    fields = {"step": step, "tta": tta, "save_probabilities": save_probabilities, "save_attention": save_attention,
              "save_uncertainty": save_uncertainty, "postprocess": not no_postprocessing, "overwrite": overwrite,
              "series": series, "output_format": output_format, "stitch_device": stitch_device,
              "backend": backend, "statistics": statistics, "preview": preview}
    if cluster is not None:
        from medseg.cluster.jobs import submit_predict

        load = {"config_name": config, "folds": fold_list, "device": device}
        ids = (submit_predict(input, output, model, cluster(model), options=fields, load=load, shards=shards)
               if shards else submit_predict(input, output, model, cluster(model), options=fields, load=load,
                                             shards=num_parts, parts=[part]))
        _print_jobs({"predict": ids})
        return
    if shards:
        raise MedsegError("--shards needs --executor slurm (locally: --num-parts N --part I)")
    from medseg.inference.predictor import PredictOptions, predict_folder

    options = PredictOptions(**fields, num_parts=num_parts, part=part, progress=True)
    written = predict_folder(input, output, model, options, config_name=config, folds=fold_list,
                             device=_device(device))
    console.print(f"[green]{len(written)} segmentation(s) written to[/] {output}")


@app.command()
def report(
    workdir: Path = typer.Argument(..., help="Work directory."),
    output: Path = typer.Option(None, "-o", "--output", help="HTML file to write (default: WORK/report.html)."),
) -> None:
    """One self-contained HTML page (images embedded, opens offline): the dataset, the plans and why,
    training curves, cross-validation, find-best's choice, per-case metrics and overlays."""
    from medseg.orchestration.report import write_report

    console.print(f"[green]report written to[/] {write_report(workdir, output)}")


@app.command("export-model")
def export_model(
    workdir: Path = typer.Argument(..., help="Trained work directory."),
    output: Path = typer.Option(..., "-o", "--output", help="The zip file to write."),
    configs: str = typer.Option(None, "--configs", help="Comma-separated configurations (default: model.json's "
                                "members, else every trained one)."),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds, or 'full' (default: model.json's, else "
                              "every finished fold)."),
) -> None:
    """Pack what prediction needs (plans, fingerprint, label map, chosen checkpoints, model.json, the
    code version and a manifest of SHA-256 hashes) into one zip file; `predict -m FILE.zip` uses it."""
    from medseg.inference.archive import export_model as export

    fold_list = [f if not f.isdigit() else int(f) for f in _configs(folds)] if folds else None
    manifest = export(workdir, output, _configs(configs), fold_list)
    console.print(f"[green]exported[/] {', '.join(f'{k} folds {v}' for k, v in manifest['configs'].items())} "
                  f"({len(manifest['files'])} files) to {output}")


@app.command("import-model")
def import_model(
    archive: Path = typer.Argument(..., help="A zip file made by `medseg export-model`."),
    output: Path = typer.Option(..., "-o", "--output", help="The new work directory."),
) -> None:
    """Unpack a model archive into a new work directory, refusing absolute paths, '..' entries, links,
    files not in the manifest or not matching its hashes, and checkpoints that are not plain weights."""
    from medseg.inference.archive import import_model as unpack

    console.print(f"[green]imported into[/] {unpack(archive, output)}")


@app.command("find-best")
@cluster_options
def find_best(
    workdir: Path = typer.Argument(..., help="Work directory with cross-validated configurations (train -f all)."),
    configs: str = typer.Option(None, "--configs", help="Comma-separated configurations to consider "
                                                         "(default: every one with all folds trained)."),
    workers: int = typer.Option(None, "--workers"),
    after: str = typer.Option(None, "--after", help="Slurm: start after these comma-separated jobs succeeded "
                              "(default: this work directory's training jobs that have not ended)."),
    try_backends: str = typer.Option(None, "--try-backends",
                                     help="Also choose the CPU forward pass: re-predict the chosen model's "
                                          "out-of-fold cases with these comma-separated backends (or 'auto': "
                                          "the installed ones) and use the fastest whose foreground Dice is "
                                          "within 0.005 of torch's (recorded in model.json)."),
    cluster=None,
) -> None:
    """Choose the model on out-of-fold predictions: every configuration and pairwise ensemble, then
    postprocessing and the QC threshold. Writes model.json and find_best/ (table, plot)."""
    if cluster is not None:
        if try_backends:
            raise typer.BadParameter("--try-backends runs locally only; run find-best without --executor slurm")
        from medseg.cluster.jobs import submit_find_best

        _print_jobs({"find-best": submit_find_best(workdir, cluster(workdir), configs=_configs(configs),
                                                   after=_configs(after))})
        return
    from medseg.orchestration.selection import find_best as run
    from medseg.workflow import default_workers

    chosen, report = run(workdir, configs=_configs(configs), num_workers=workers or default_workers(), progress=True,
                         try_backends=_configs(try_backends))
    print(report)
    console.print(f"[green]model written[/]: {WorkDir(workdir).model}")


@app.command()
def evaluate(
    pred: Path = typer.Argument(..., help="Folder of predicted label maps."),
    gt: Path = typer.Argument(..., help="Folder of reference label maps."),
    output: Path = typer.Option(None, "-o", "--output", help="Report folder (default: PRED/report)."),
    workers: int = typer.Option(None, "--workers"),
) -> None:
    """Dice, IoU, HD95 (mm), volumes per case and class: metrics.csv, summary.json, metrics.png."""
    from medseg.evaluation.report import evaluate_folder, format_summary
    from medseg.workflow import default_workers

    output = output or pred / "report"
    summary = evaluate_folder(pred, gt, output, num_workers=workers or default_workers(), progress=True)
    print(format_summary(summary))
    console.print(f"report: {output}")


@app.command()
@cluster_options
def pipeline(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Work directory."),
    configs: str = typer.Option("3d_fullres", "-c", "--configs", help="Comma-separated configurations to plan, "
                                "cross-validate and choose from."),
    time_budget: float = typer.Option(None, "--time-budget", help="Training minutes per fold (plan and train)."),
    epochs: int = typer.Option(None, "--epochs"),
    iterations: int = typer.Option(None, "--iterations-per-epoch"),
    device: str = typer.Option(None, "--device"),
    predict_input: Path = typer.Option(None, "--predict-input", help="Also segment these images with the chosen model."),
    predict_output: Path = typer.Option(None, "--predict-output", help="... into this folder."),
    shards: int = typer.Option(1, "--shards", help="Slurm: prediction shards (one job array)."),
    cluster=None,
) -> None:
    """plan → train every fold of each configuration → find-best (→ predict): with --executor slurm a
    chain of jobs, each starting when the one before succeeded (returns at once); locally one after
    the other."""
    if (predict_input is None) != (predict_output is None):
        raise MedsegError("--predict-input and --predict-output go together")
    names = _configs(configs)
    plan_options = {"time_budget_min": time_budget, "device": device}
    train_options = {"epochs": epochs, "iterations_per_epoch": iterations, "time_budget_min": time_budget,
                     "device": device}
    predict = (predict_input, predict_output) if predict_input else None
    if cluster is not None:
        from medseg.cluster.jobs import submit_pipeline

        _print_jobs(submit_pipeline(dataset, output, names, cluster(output), plan_options=plan_options,
                                    train_options=train_options, predict=predict, shards=shards))
        return
    from medseg import workflow
    from medseg.inference.predictor import predict_folder
    from medseg.orchestration.crossval import parse_folds, train_folds
    from medseg.orchestration.selection import find_best as run_find_best

    workflow.plan(dataset, output, configs=names, progress=True, **plan_options)
    for name in names:
        for line in train_folds(output, name, parse_folds(output, name, "all"), progress=True,
                                **{**train_options, "device": _device(device)}):
            console.print(line)
    run_find_best(output, configs=names, num_workers=workflow.default_workers(), progress=True)
    if predict:
        predict_folder(*predict, output, device=_device(device), progress=True)
    console.print(f"[green]pipeline done[/]: {WorkDir(output).model}")


@app.command()
def jobs(workdir: Path = typer.Argument(..., help="Work directory whose jobs were submitted with --executor slurm.")
         ) -> None:
    """The submitted jobs: the scheduler's state, the run's progress (epoch, pseudo-Dice, ETA), the log."""
    from rich.table import Table

    from medseg.cluster.jobs import job_table

    table = Table("job", "what", "state", "progress", "log")
    for row in job_table(workdir):
        table.add_row(row.job_id, row.name, row.state, row.progress, row.log)
    Console(width=200).print(table)


@app.command()
def serve(config: Path = typer.Argument(..., help="Node configuration (JSON): ae_title, port, allowed_calling_aets, "
                                                   "destination, model_dir, spool_dir, series, idle_timeout_s, "
                                                   "concurrency.")) -> None:
    """Run a DICOM node: receive series from a PACS, segment each complete series, send back DICOM SEG."""
    from medseg.deploy.node import Node, NodeConfig

    Node(NodeConfig.load(config)).serve_forever()


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_output"), "-o", "--output", help="Where to write everything."),
    minutes: float = typer.Option(3.0, "--minutes", help="Training time budget."),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Bundled hippocampus subset → plan → train (a few minutes) → predict held-out cases → evaluate."""
    from medseg.demo import run_demo

    report = run_demo(output, minutes=minutes, device=_device(device))
    console.print(f"[green]demo done[/]; report: {report}")


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except MedsegError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors (typer may vendor click, so duck-typed)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
