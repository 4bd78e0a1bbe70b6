"""Runnable experiments (Hydra apps): paper reproduction, plan evaluation, training, evaluation, reports."""
