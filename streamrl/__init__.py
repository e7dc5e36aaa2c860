"""streamrl: asynchronous RL post-training for LLMs (slime-compatible flags, streaming rollouts).

Importing this package is cheap on purpose: no torch, ray or transformers at import time.
"""

__version__ = "0.1.0"
