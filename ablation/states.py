"""Run and sweep states: the one owner of their names (the store's rows, training records, the tables)."""

PENDING = "pending"  # a run waiting for a worker (also one requeued after a stop, to resume)
RUNNING = "running"  # a run claimed by a worker; a sweep still handing out runs
FINISHED = "finished"  # a run that trained all its epochs; a sweep with no run left to claim
STOPPED = "stopped"  # a run cut short from outside (a signal, hyperband); a sweep stopped by `sweep stop`
STOPPED_EARLY = "stopped_early"  # a run ended by early stopping (val loss not improved for `early_stopping` epochs)
FAILED = "failed"  # a run that raised an error
DIVERGED = "diverged"  # a run whose train or val loss became NaN or infinite

IN_FLIGHT = (PENDING, RUNNING)  # runs still to train
COUNTED = (FINISHED, STOPPED_EARLY)  # runs whose metrics enter means; the rest are counted and shown
BROKEN = (FAILED, DIVERGED)  # runs that ended without a result (`sweep retry` requeues them)
