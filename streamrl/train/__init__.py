"""Training backends: FSDP2 ranks as Ray actors (`fsdp.py`), their group (`group.py`), batch building (`batch.py`)."""
