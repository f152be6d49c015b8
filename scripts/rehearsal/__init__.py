"""The cluster rehearsal's parts, scenarios and checks (scripts/rehearse_cluster.py; tests/test_cluster_rehearsal.py)."""
