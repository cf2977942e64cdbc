"""The nnU-Net v2 side of ``benchmarks/side_by_side.py``. Runs inside the nnU-Net venv (made by that
script), never the project's: nnunetv2 pulls timm → torchvision → a CUDA torch.

    python nnunet_driver.py throughput --dataset 4 --plans nnUNetPlans_eq --warmup 3 --iters 20
    python nnunet_driver.py train --dataset 4 --plans nnUNetPlans --fold 0 --minutes 30

Both use nnU-Net's own trainer (``nnUNetTrainer``: its data loader, augmentation processes, loss,
optimiser and deep supervision) on the CPU. ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` come from the environment, as for nnU-Net's own commands. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types


def _trainer(dataset: str, configuration: str, fold: int, plans_id: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    folder = join(nnUNet_preprocessed, name)
    plans = load_json(join(folder, plans_id + ".json"))
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    dataset_json = load_json(join(folder, "dataset.json"))
    torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train does for -device cpu
    return nnUNetTrainer(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                         device=torch.device("cpu"))


def throughput(args: argparse.Namespace) -> dict:
    """Seconds per training iteration (data loading + augmentation + forward/backward/step), after
    ``warmup`` iterations."""
    trainer = _trainer(args.dataset, args.configuration, args.fold, args.plans)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    times = []
    for _ in range(args.warmup + args.iters):
        t = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        times.append(time.perf_counter() - t)
    measured = times[args.warmup:]
    batch = trainer.configuration_manager.batch_size
    return {"batch_size": batch, "patch_size": list(trainer.configuration_manager.patch_size),
            "iteration_s": measured, "samples_per_s": batch * len(measured) / sum(measured),
            "da_processes": _da_processes()}


def _da_processes() -> int:
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return get_allowed_n_proc_DA()


def train(args: argparse.Namespace) -> dict:
    """nnU-Net's training for a wall-clock budget, then its own validation of the fold's held-out
    cases (sliding window with mirroring, exported in the original geometry).

    nnU-Net has no time budget, so this does what a user with a deadline would: epochs of
    ``iterations`` iterations, and after every epoch the number of epochs is re-estimated from the
    mean epoch time so far, so the polynomial learning rate anneals to ~0 within the budget. The
    trainer stays an ``nnUNetTrainer`` (its checkpoints load in ``nnUNetv2_predict`` as usual)."""
    trainer = _trainer(args.dataset, args.configuration, args.fold, args.plans)
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.val_iterations
    budget_s = 60.0 * args.minutes

    def run_training(self) -> None:
        import torch

        self.on_train_start()
        t0 = time.perf_counter()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()  # increments current_epoch
            elapsed = time.perf_counter() - t0
            per_epoch = elapsed / self.current_epoch
            self.num_epochs = max(self.current_epoch, min(self.num_epochs, int(budget_s / per_epoch)))
            self.lr_scheduler.max_steps = self.num_epochs
        self.training_s = time.perf_counter() - t0
        self.on_train_end()

    trainer.run_training = types.MethodType(run_training, trainer)
    trainer.run_training()
    t = time.perf_counter()
    trainer.perform_actual_validation(False)
    validation_s = time.perf_counter() - t
    return {"epochs": trainer.current_epoch, "iterations": trainer.current_epoch * args.iterations,
            "training_s": trainer.training_s, "validation_s": validation_s,
            "batch_size": trainer.configuration_manager.batch_size,
            "features": trainer.configuration_manager.network_arch_init_kwargs.get("features_per_stage"),
            "validation_folder": os.path.join(trainer.output_folder, "validation")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["throughput", "train"])
    parser.add_argument("--dataset", required=True, help="dataset id or name (Dataset004_Hippocampus)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--plans", default="nnUNetPlans")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch (train)")
    parser.add_argument("--val-iterations", type=int, default=10, help="pseudo-validation batches per epoch (train)")
    args = parser.parse_args()
    result = throughput(args) if args.command == "throughput" else train(args)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # nnU-Net's augmentation processes can keep a normal exit waiting


if __name__ == "__main__":
    main()
