"""Real SGLang: server launcher (`launcher.py`, Ray actors), sglang-router (`router.py`), child processes with log
tails (`proc.py`). Importing this package is cheap: SGLang itself runs in the child processes."""
