"""Weight transports from the trainer to the engines (`base.py` for the contract, one file per transport)."""
