"""Embedded inference engine: continuous batching over a HF causal LM behind SGLang's native HTTP API.

Import the pieces from their modules (`actor.EmbeddedEngine`, `actor.EngineActor`, `weights.serialize_named_tensors`,
...); this package import stays cheap (no torch/transformers) so that clients can depend on it freely.
"""

__all__ = ["EmbeddedEngine", "EngineActor", "make_engine_actor", "serialize_named_tensors", "encode_update_request"]


def __getattr__(name: str):  # lazy re-exports (PEP 562)
    if name in ("EmbeddedEngine", "EngineActor", "make_engine_actor"):
        from . import actor

        return getattr(actor, name)
    if name in ("serialize_named_tensors", "encode_update_request"):
        from . import weights

        return getattr(weights, name)
    raise AttributeError(name)
