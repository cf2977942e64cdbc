"""Orchestration: the stages that compose training, inference and evaluation (fold validation,
cross-validation, find-best)."""
