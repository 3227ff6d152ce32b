"""share_jax."""
