"""Agents for CoEL-Gym: the Policy interface, non-learned baselines and (elsewhere) trained agents."""

from agents.policy import ActionPolicy, Decision, Policy

__all__ = ["ActionPolicy", "Decision", "Policy"]
