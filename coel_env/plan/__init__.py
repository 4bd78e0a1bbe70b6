"""What an agent decides: a DeploymentPlan (deployment.py), N plans as arrays (batch.py: PlanBatch), and the
repair that makes a proposed plan valid for the memory and live servers it meets (repair.py, kernels.py)."""
