"""Running on Ray: start or join a cluster, actor options, job submission, schedules, table locks."""
