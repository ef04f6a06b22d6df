"""The operator's view of Kubernetes: pure builders of children, and the few client calls."""
