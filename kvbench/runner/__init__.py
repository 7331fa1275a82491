"""The runner: a config becomes a run folder. `main` (Hydra command line) -> `run` (plan -> resume -> loop ->
finish) with its run folder (`folder`), provenance (`provenance`), identity (`identity`), scores (`scoring`),
shards (`shards`, `merge`, `lock`), progress of a sweep (`status`) and W&B (`tracking`)."""
