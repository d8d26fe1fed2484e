"""The training engine: exact gradient accumulation in plain PyTorch.

It imports no database, Celery, web or settings module: the Celery task and the
`trainjob run` command both drive it through `worker.engine.trainer.train`.
Importing this package does not import torch; its modules do.
"""
