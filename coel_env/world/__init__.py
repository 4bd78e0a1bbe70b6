"""The world an agent deploys into: the cluster built from a scenario spec (cluster.py), its state and dynamics
(state.py: ClusterState, Scenario, StateBatch) and the routing traces that set expert popularity (traces.py)."""
