"""The join gateway (`townsquare edge`): admission, routing by the shard map, migration.

Data plane: it imports the API's names, the shard map's format and tickets, never kopf, the
operator's handlers or its Kubernetes shell, so it keeps serving while the operator restarts.
`admission` is the pure core (time is a parameter); `watch`, `reports` and `server` are the
shell around it.
"""
