"""Backend adapters: one module per backend, each implementing adapters.base."""
