"""Rollout: inference engines and the clients that drive them."""
