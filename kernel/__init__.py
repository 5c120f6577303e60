"""Distributed operators written once against the Communicator."""
