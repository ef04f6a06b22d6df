"""townsquare: a Kubernetes operator that pre-warms and autoscales relays for live audio rooms."""
