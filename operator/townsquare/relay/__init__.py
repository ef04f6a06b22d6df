"""The reference relay and origin: the data plane that carries a room's audio (see README).

Never imports kopf, the handlers or the operator's Kubernetes client: relays keep serving
while the operator restarts.
"""
