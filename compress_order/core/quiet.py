"""Third-party notices a user of this tool cannot act on, dropped at the command line and in every Hydra job."""

from __future__ import annotations

import logging


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains a given fragment."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# Deprecation notices one third-party library logs about another, which a user of this tool cannot act on:
# (logger, message fragment). torchao, imported by transformers, registers Enum pytree constants.
THIRD_PARTY_NOTICES = [
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
]


def quiet_third_party() -> None:
    """Keep the terminal to the progress bar and the results. Called at the command line and again at the start
    of every Hydra job, since a launcher may run jobs in fresh processes (joblib, submitit)."""
    for name, fragment in THIRD_PARTY_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))


class BelowWarning(logging.Filter):
    """Passes records below WARNING: the job's console handler prints those on stdout, while warnings and errors
    go to stderr (conf/config.yaml `hydra.job_logging`), where a user and a pipe expect them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING
