"""The weight wire format between the trainer and the engines: request bodies, bucket layout and alignment.

`streamrl/sync` (the trainer's side: packing, transports, the sync sequence) and the embedded engine's server (the
receiving side) both import this package and never each other.
"""
